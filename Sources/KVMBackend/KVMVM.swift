import CVMMSys
import Glibc
import GuestMemory

/// A KVM virtual machine: its memslots and vCPUs.
public final class KVMVM: @unchecked Sendable {
    public let system: KVMSystem
    public let fd: Int32
    /// Keeps every slot's host memory alive as long as KVM may map it.
    private var memories: [UInt32: HostMemory] = [:]
    private var bases: [UInt32: GPA] = [:]
    /// Writes the VMM itself made into logging slots: KVM only sees the guest's.
    var vmmDirty: [UInt32: DirtyBitmap] = [:]
    /// Bytes of each vCPU's dirty ring, once enabled.
    public internal(set) var dirtyRingBytes = 0

    public init(system: KVMSystem) throws(KVMError) {
        self.system = system
        let fd = cvmm_ioctl_value(system.fd, cvmm_KVM_CREATE_VM, 0)
        guard fd >= 0 else { throw .ioctl("KVM_CREATE_VM", errno: errno) }
        self.fd = fd
    }

    deinit { close(fd) }

    /// KVM_SET_USER_MEMORY_REGION: maps `memory` at `gpa` as slot `slot` (size 0 deletes the slot).
    public func setMemory(slot: UInt32, gpa: GPA, memory: HostMemory, logDirty: Bool = false, readOnly: Bool = false) throws(KVMError) {
        var flags: UInt32 = 0
        if logDirty { flags |= UInt32(KVM_MEM_LOG_DIRTY_PAGES) }
        if readOnly { flags |= UInt32(KVM_MEM_READONLY) }
        var region = kvm_userspace_memory_region(slot: slot, flags: flags, guest_phys_addr: gpa.raw,
                                                 memory_size: memory.size, userspace_addr: memory.base.raw)
        guard cvmm_ioctl(fd, cvmm_KVM_SET_USER_MEMORY_REGION, &region) == 0 else {
            throw .ioctl("KVM_SET_USER_MEMORY_REGION(slot \(slot), \(formatBytes(memory.size)) at \(gpa))", errno: errno)
        }
        memories[slot] = memory
        bases[slot] = gpa
        if logDirty {
            if vmmDirty[slot] == nil { vmmDirty[slot] = DirtyBitmap(pages: memory.size >> 12) }
        } else {
            vmmDirty[slot] = nil
        }
    }

    /// Copies `bytes` into guest memory as the VMM (a device, a loader); in a logging slot the pages
    /// are recorded in our own bitmap, which getDirtyLog merges with KVM's.
    public func writeGuest(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(KVMError) {
        guard let (slot, base) = bases.first(where: { s in
            gpa >= s.value && gpa.raw + UInt64(bytes.count) <= s.value.raw + (memories[s.key]?.size ?? 0)
        }).map({ ($0.key, $0.value) }), let memory = memories[slot] else {
            throw .ioctl("write of \(bytes.count) bytes at \(gpa) outside every memslot", errno: EFAULT)
        }
        guard !bytes.isEmpty else { return }
        (memory.pointer + Int(gpa - base)).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        if let log = vmmDirty[slot] {
            let first = (gpa - base) >> 12, last = (gpa - base + UInt64(bytes.count) - 1) >> 12
            log.set(first: first, count: last - first + 1)
        }
    }

    /// Pages the VMM wrote into a logging slot since the last call (for dirty-ring users, whose
    /// guest pages come from the rings).
    public func getVMMDirty(slot: UInt32) throws(KVMError) -> [UInt64] {
        var words: [UInt64] = []
        vmmDirty[slot]?.harvest(into: &words)
        return words
    }

    /// Puts pages back into a logging slot's log (reported by the next getDirtyLog).
    public func markDirty(slot: UInt32, bitmap: [UInt64]) {
        vmmDirty[slot]?.set(bitmap: bitmap)
    }

    /// The host memory behind a slot.
    public func memory(slot: UInt32) -> HostMemory? { memories[slot] }

    public func createVCPU(id: Int32) throws(KVMError) -> KVMVCPU {
        try KVMVCPU(vm: self, id: id)
    }
}
