import CVMMSys
import GuestMemory

/// The guest-physical pages the VMM itself fills to run guest code in 64-bit mode at CPL3, where
/// kvm_pvm runs it natively (CPL0 code would go through KVM's instruction emulator). Everything the
/// guest program touches besides its working set lies below `reservedEnd`.
public enum X86Layout {
    /// Page tables: one PML4, one PDPT, and one page directory per GiB, mapping linear addresses to
    /// RAM (RAMLayout: the identity for one slot at 0) with user-accessible 2 MiB pages.
    public static let pml4 = GPA(0x1000)
    public static let pdpt = GPA(0x2000)
    public static let firstPD = GPA(0x90000)
    /// At most this many GiB are mapped (one page directory each, 0x90000..0xD0000).
    public static let maxGiB: UInt64 = 64
    public static let gdt = GPA(0x7000)
    public static let tss = GPA(0x8000)
    /// Where the guest program's code goes.
    public static let code = GPA(0x10000)
    /// Each vCPU's parameter page: 0x20000 + 4 KiB per vCPU (passed to the program in rdi).
    public static let params = GPA(0x20000)
    /// The zipf quantile table the workload reads (4097 32-bit entries).
    public static let zipfTable = GPA(0x40000)
    /// The initial stack pointer of vCPU 0; each further vCPU's stack starts 16 KiB lower (the
    /// lowest ends at 0x50000, clear of the zipf table).
    public static let stackTop = GPA(0x90000)
    public static let stackPerVCPU: UInt64 = 0x4000
    public static let maxVCPUs = 16
    /// The program's own pages end here; a workload's working set starts at or above it.
    public static let reservedEnd = GPA(0x10_0000)

    /// Selectors: user code and data carry RPL 3.
    public static let userCode: UInt16 = 0x18 | 3
    public static let userData: UInt16 = 0x20 | 3
    public static let taskRegister: UInt16 = 0x28
}

extension KVMVCPU {
    /// Builds page tables, GDT and TSS in `memory` (slot 0, at GPA 0) and puts the vCPU in 64-bit mode
    /// at CPL3 with IOPL 3 (so port IO still exits to the VMM), at `entry` with an empty stack. The
    /// page tables map the linear addresses of `layout` (by default `memory` alone, identity-mapped).
    public func enterLongModeUser(memory: HostMemory, layout: RAMLayout? = nil, entry: GPA, stack: GPA = X86Layout.stackTop,
                                  argument: UInt64 = 0) throws(KVMError) {
        let layout = layout ?? RAMLayout(size: memory.size)
        let mem = memory.pointer
        func put(_ gpa: GPA, _ index: Int, _ value: UInt64) {
            mem.storeBytes(of: value, toByteOffset: Int(gpa.raw) + index * 8, as: UInt64.self)
        }
        let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4, large: UInt64 = 0x80
        let gib = min(X86Layout.maxGiB, (layout.size + (1 << 30) - 1) >> 30)
        put(X86Layout.pml4, 0, X86Layout.pdpt.raw | present | writable | user)
        for g in 0..<gib {
            let pd = X86Layout.firstPD + g * 0x1000
            put(X86Layout.pdpt, Int(g), pd.raw | present | writable | user)
            for i in 0..<512 {
                let linear = (g << 30) | (UInt64(i) << 21)
                guard linear < layout.size else { break }
                put(pd, i, layout.gpa(linear: linear).raw | present | writable | user | large)
            }
        }
        // GDT: null, kernel code, kernel data, user code (64-bit), user data, 16-byte TSS descriptor.
        let tssLimit: UInt64 = 0x67
        let tssBase = X86Layout.tss.raw
        let descriptors: [UInt64] = [
            0,
            0x00AF_9A00_0000_FFFF,          // kernel code, L=1
            0x00CF_9200_0000_FFFF,          // kernel data
            0x00AF_FA00_0000_FFFF,          // user code, DPL 3, L=1
            0x00CF_F200_0000_FFFF,          // user data, DPL 3
            tssLimit | ((tssBase & 0xFF_FFFF) << 16) | (0x89 << 40) | ((tssBase >> 24 & 0xFF) << 56),
            tssBase >> 32,
        ]
        for (i, d) in descriptors.enumerated() { put(X86Layout.gdt, i, d) }
        // The VMM wrote these pages: a logging slot must report them.
        vm.recordWrite(X86Layout.pml4, length: 0x1000)
        vm.recordWrite(X86Layout.pdpt, length: 0x1000)
        vm.recordWrite(X86Layout.firstPD, length: gib * 0x1000)
        vm.recordWrite(X86Layout.gdt, length: UInt64(descriptors.count * 8))

        var s = try specialRegisters()
        s.cr3 = X86Layout.pml4.raw
        s.cr4 = (1 << 5) | (1 << 9) | (1 << 10)          // PAE, OSFXSR, OSXMMEXCPT
        s.cr0 = 0x8005_0033                              // PG, AM, WP, NE, ET, MP, PE
        s.efer = (1 << 8) | (1 << 10) | 1                // LME, LMA, SCE
        s.gdt.base = X86Layout.gdt.raw
        s.gdt.limit = UInt16(descriptors.count * 8 - 1)
        s.idt.base = 0
        s.idt.limit = 0
        var code = kvm_segment()
        code.base = 0; code.limit = 0xFFFF_FFFF; code.selector = X86Layout.userCode
        code.type = 11; code.present = 1; code.dpl = 3; code.s = 1; code.l = 1; code.g = 1
        var data = kvm_segment()
        data.base = 0; data.limit = 0xFFFF_FFFF; data.selector = X86Layout.userData
        data.type = 3; data.present = 1; data.dpl = 3; data.db = 1; data.s = 1; data.g = 1
        var tr = kvm_segment()
        tr.base = tssBase; tr.limit = UInt32(tssLimit); tr.selector = X86Layout.taskRegister
        tr.type = 11; tr.present = 1
        s.cs = code
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = tr
        try setSpecialRegisters(s)
        try setEntryRegisters(entry: entry, stack: stack, argument: argument)
    }

    /// Points a vCPU already in 64-bit CPL3 mode at `entry` with an empty stack and `argument` in rdi.
    public func setEntryRegisters(entry: GPA, stack: GPA, argument: UInt64) throws(KVMError) {
        var r = kvm_regs()
        r.rip = entry.raw
        // A call pushed a return address: keep the ABI's 16-byte alignment at entry.
        r.rsp = stack.raw - 8
        r.rdi = argument
        r.rflags = 0x2 | (3 << 12)                       // reserved bit 1, IOPL 3
        try setRegisters(r)
    }
}
