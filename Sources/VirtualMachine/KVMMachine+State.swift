import CVMMSys
import KVMBackend
import Workload

/// The kvm backend's saved state. Format 1: the workload spec (u32 length, UTF-8), the vCPU count
/// (u32), then per vCPU its registers field by field, little-endian, in KVM's order: the 18 general
/// registers (rax ... r15, rip, rflags); the special registers (8 segments cs, ds, es, fs, gs, ss, tr,
/// ldt, each base u64, limit u32, selector u16, then type, present, dpl, db, s, l, g, avl, unusable
/// a byte each; gdt and idt, base u64 and limit u16; cr0, cr2, cr3, cr4, cr8, efer, apic_base; the
/// 4-word interrupt bitmap); the FPU (8 x87 registers of 16 bytes, fcw, fsw, ftwx, last opcode,
/// last ip, last dp, 16 XMM registers of 16 bytes, mxcsr). The guest program keeps everything else
/// in guest memory. Format 0 (version 2 and 3 files): the spec, then the kernel's structs as raw bytes.
extension KVMMachine {
    static let stateFormat: UInt16 = 1

    static func encode(_ spec: WorkloadSpec, _ states: [KVMVCPUState]) -> MachineState {
        var w = StateWriter()
        w.string(spec.description)
        w.int(UInt32(states.count))
        for s in states {
            let r = s.regs
            for v in [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                      r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags] { w.int(v) }
            let sr = s.sregs
            for g in [sr.cs, sr.ds, sr.es, sr.fs, sr.gs, sr.ss, sr.tr, sr.ldt] {
                w.int(g.base); w.int(g.limit); w.int(g.selector)
                for b in [g.type, g.present, g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable] { w.int(b) }
            }
            for t in [sr.gdt, sr.idt] { w.int(t.base); w.int(t.limit) }
            for v in [sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8, sr.efer, sr.apic_base] { w.int(v) }
            let ib = sr.interrupt_bitmap
            for v in [ib.0, ib.1, ib.2, ib.3] { w.int(v) }
            let f = s.fpu
            w.raw(f.fpr)
            w.int(f.fcw); w.int(f.fsw); w.int(f.ftwx); w.int(f.last_opcode); w.int(f.last_ip); w.int(f.last_dp)
            w.raw(f.xmm)
            w.int(f.mxcsr)
        }
        return MachineState(backend: .kvm, format: stateFormat, bytes: w.bytes)
    }

    static func decode(_ state: MachineState, vcpus: Int) throws -> (WorkloadSpec, [KVMVCPUState]) {
        try StateReader.check(state, is: .kvm, newest: stateFormat)
        var r = StateReader(state)
        let spec = try r.workload()
        if state.format == 0 {
            let raw = r.remaining, size = MemoryLayout<KVMVCPUState>.size
            guard raw.count == size * vcpus else {
                throw VMError.failed("the kvm backend's state (format 0) holds \(raw.count) bytes of registers; \(vcpus) vCPUs need \(size * vcpus)")
            }
            return (spec, raw.withUnsafeBytes { b in (0..<vcpus).map { b.loadUnaligned(fromByteOffset: $0 * size, as: KVMVCPUState.self) } })
        }
        try r.vcpus(vcpus)
        var states: [KVMVCPUState] = []
        for _ in 0..<vcpus {
            var s = KVMVCPUState()
            for k in [\kvm_regs.rax, \.rbx, \.rcx, \.rdx, \.rsi, \.rdi, \.rsp, \.rbp, \.r8, \.r9, \.r10, \.r11,
                      \.r12, \.r13, \.r14, \.r15, \.rip, \.rflags] { s.regs[keyPath: k] = try r.int() }
            for k in [\kvm_sregs.cs, \.ds, \.es, \.fs, \.gs, \.ss, \.tr, \.ldt] {
                var g = kvm_segment()
                g.base = try r.int(); g.limit = try r.int(); g.selector = try r.int()
                for b in [\kvm_segment.type, \.present, \.dpl, \.db, \.s, \.l, \.g, \.avl, \.unusable] { g[keyPath: b] = try r.int() }
                s.sregs[keyPath: k] = g
            }
            for k in [\kvm_sregs.gdt, \.idt] {
                var t = kvm_dtable()
                t.base = try r.int(); t.limit = try r.int()
                s.sregs[keyPath: k] = t
            }
            for k in [\kvm_sregs.cr0, \.cr2, \.cr3, \.cr4, \.cr8, \.efer, \.apic_base] { s.sregs[keyPath: k] = try r.int() }
            s.sregs.interrupt_bitmap = (try r.int(), try r.int(), try r.int(), try r.int())
            try r.raw(into: &s.fpu.fpr)
            s.fpu.fcw = try r.int(); s.fpu.fsw = try r.int(); s.fpu.ftwx = try r.int()
            s.fpu.last_opcode = try r.int(); s.fpu.last_ip = try r.int(); s.fpu.last_dp = try r.int()
            try r.raw(into: &s.fpu.xmm)
            s.fpu.mxcsr = try r.int()
            states.append(s)
        }
        try r.finish()
        return (spec, states)
    }
}
