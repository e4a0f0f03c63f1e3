import CVMMSys
import Foundation
import Glibc
import GuestMemory
import HostSystem

/// A KVM virtual machine: its memslots and vCPUs.
///
/// The slot map is read by the VMM's writes and dirty-log calls and changed by slot and logging
/// changes, from any thread: one lock guards it, held across each KVM_SET_USER_MEMORY_REGION so the
/// map and KVM's own never disagree, and across each VMM write so a slot cannot change under it.
public final class KVMVM: @unchecked Sendable {   // slot table under its lock; the kernel serializes the ioctls
    public let system: KVMSystem
    let fd: FileDescriptor

    /// A memslot as KVM holds it.
    struct Slot {
        var gpa: GPA
        let memory: HostMemory
        var logDirty: Bool
        var readOnly: Bool
        func contains(_ gpa: GPA, _ length: UInt64) -> Bool {
            gpa >= self.gpa && gpa.raw - self.gpa.raw <= memory.size && length <= memory.size - (gpa.raw - self.gpa.raw)
        }
    }
    private let lock = NSLock()
    private var slots: [UInt32: Slot] = [:]
    /// The VMM's own writes into logging slots (KVM sees only the guest's), and, under dirty rings,
    /// the pages harvested from the rings until a get reports them. Kept across a move and a flags
    /// change while logging stays on, as KVM keeps its dirty bitmap.
    public let vmmWrites = VMMWriteLog()
    /// Bytes of each vCPU's dirty ring, once enabled.
    public internal(set) var dirtyRingBytes = 0
    /// Manual protect as last enabled: a page then stays reported until a clear names it.
    public internal(set) var manualProtect = false

    public init(system: KVMSystem) throws(KVMError) {
        self.system = system
        let fd = cvmm_ioctl_value(system.fd.raw, cvmm_KVM_CREATE_VM, 0)
        guard fd >= 0 else { throw .ioctl("KVM_CREATE_VM", errno: errno) }
        self.fd = FileDescriptor(owning: fd)
    }

    /// Runs `body` on the slot map under its lock.
    func withSlots<T, E: Error>(_ body: (inout [UInt32: Slot]) throws(E) -> T) throws(E) -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&slots)
    }

    /// KVM_SET_USER_MEMORY_REGION: creates slot `slot` over `memory` at `gpa`, or changes an existing
    /// one (a new `gpa` moves it; `logDirty` starts or stops logging). KVM refuses a change of the
    /// host memory, size or read-only flag of an existing slot: delete and add it again.
    public func setMemory(slot: UInt32, gpa: GPA, memory: HostMemory, logDirty: Bool = false, readOnly: Bool = false) throws(KVMError) {
        try withSlots { (slots) throws(KVMError) in
            if let old = slots[slot], old.memory !== memory || old.readOnly != readOnly {
                throw .refused("memslot \(slot) exists with other memory or another read-only flag: delete it and add it again (KVM cannot change them in place)")
            }
            if logDirty && readOnly { throw .refused("memslot \(slot) cannot be read-only and dirty logging: the guest cannot dirty it") }
            try setRegion(slot: slot, gpa: gpa, size: memory.size, host: memory.base.raw, logDirty: logDirty, readOnly: readOnly)
            slots[slot] = Slot(gpa: gpa, memory: memory, logDirty: logDirty, readOnly: readOnly)
            if logDirty { vmmWrites.start(slot: Int(slot), pages: memory.size >> 12) } else { vmmWrites.stop(slot: Int(slot)) }
        }
    }

    /// Deletes slot `slot` (KVM_SET_USER_MEMORY_REGION with size 0): the guest no longer reaches it,
    /// and its unreported dirty pages are gone with it.
    public func deleteMemory(slot: UInt32) throws(KVMError) {
        try withSlots { (slots) throws(KVMError) in
            guard let old = slots[slot] else { throw .refused("there is no memslot \(slot)") }
            try setRegion(slot: slot, gpa: old.gpa, size: 0, host: 0, logDirty: false, readOnly: false)
            slots[slot] = nil
            vmmWrites.stop(slot: Int(slot))
        }
    }

    private func setRegion(slot: UInt32, gpa: GPA, size: UInt64, host: UInt64, logDirty: Bool, readOnly: Bool) throws(KVMError) {
        var flags: UInt32 = 0
        if logDirty { flags |= UInt32(KVM_MEM_LOG_DIRTY_PAGES) }
        if readOnly { flags |= UInt32(KVM_MEM_READONLY) }
        var region = kvm_userspace_memory_region(slot: slot, flags: flags, guest_phys_addr: gpa.raw,
                                                 memory_size: size, userspace_addr: host)
        guard cvmm_ioctl(fd.raw, cvmm_KVM_SET_USER_MEMORY_REGION, &region) == 0 else {
            throw .ioctl("KVM_SET_USER_MEMORY_REGION(slot \(slot), \(formatBytes(size)) at \(gpa))", errno: errno)
        }
    }

    /// Copies `bytes` into guest memory as the VMM (a device, a loader); in a logging slot the pages
    /// are recorded in our own log, which getDirtyLog merges with KVM's.
    public func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(KVMError) {
        try withSlots { (slots) throws(KVMError) in
            guard let (id, s) = slots.first(where: { $0.value.contains(gpa, UInt64(bytes.count)) }) else {
                throw .refused("\(bytes.count) bytes at \(gpa) are not all inside one memslot")
            }
            guard !s.readOnly else { throw .refused("memslot \(id) is read-only: the VMM's writes are refused as the guest's are") }
            guard !bytes.isEmpty else { return }
            (s.memory.pointer + Int(gpa - s.gpa)).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            vmmWrites.record(slot: Int(id), offset: gpa - s.gpa, length: UInt64(bytes.count))
        }
    }

    /// Records that the VMM wrote `length` bytes at `gpa` by other means (the guest program's loader
    /// stores straight into slot memory): logged like writeGuest.
    public func recordWrite(_ gpa: GPA, length: UInt64) {
        guard length > 0 else { return }
        withSlots { slots in
            for (id, s) in slots where s.logDirty {
                let lo = max(gpa.raw, s.gpa.raw), hi = min(gpa.raw + length, s.gpa.raw + s.memory.size)
                guard lo < hi else { continue }
                vmmWrites.record(slot: Int(id), offset: lo - s.gpa.raw, length: hi - lo)
            }
        }
    }

    /// Pages the VMM wrote into a logging slot (and ring pages put there) not yet reported: taken
    /// away, or under manual protect left until a clear names them.
    public func takeVMMDirty(slot: UInt32, into words: inout [UInt64]) {
        vmmWrites.report(slot: Int(slot), keep: manualProtect, into: &words)
    }

    /// Puts pages back into a logging slot's log (reported by the next get).
    public func markDirty(slot: UInt32, bitmap: [UInt64]) { vmmWrites.mark(slot: Int(slot), bitmap: bitmap) }

    /// Puts dirty-ring entries (slot, page) into their slots' logs. An entry of a slot deleted or no
    /// longer logging, or beyond the slot now holding its id, is dropped.
    public func markDirty(entries: [(slot: UInt32, page: UInt64)]) {
        vmmWrites.mark(entries.map { (Int($0.slot), $0.page) })
    }

    /// The host memory behind a slot.
    public func memory(slot: UInt32) -> HostMemory? { withSlots { $0[slot]?.memory } }

    /// Every slot: id, base, size and flags.
    public func slotList() -> [(id: UInt32, gpa: GPA, size: UInt64, readOnly: Bool, logDirty: Bool)] {
        withSlots { $0.map { ($0.key, $0.value.gpa, $0.value.memory.size, $0.value.readOnly, $0.value.logDirty) } }
    }

    public func createVCPU(id: Int32) throws(KVMError) -> KVMVCPU {
        try KVMVCPU(vm: self, id: id)
    }
}
