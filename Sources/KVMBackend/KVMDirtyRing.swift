import CVMMSys
import Glibc
import HostSystem
import GuestMemory
import Synchronization

/// One vCPU's KVM dirty ring (KVM_CAP_DIRTY_LOG_RING), mmap'd from the vCPU fd. KVM writes entries and
/// marks them dirty; we harvest in order and mark each reset; KVM_RESET_DIRTY_RINGS then re-protects
/// the pages and reuses the entries.
public final class KVMDirtyRing: @unchecked Sendable {   // the ring is shared with the kernel; harvests serialized by the VM's ring lock
    /// kvm_dirty_gfn flags (the ABI's bit 0 and bit 1).
    static let flagDirty: UInt32 = 1
    static let flagReset: UInt32 = 2
    /// Bytes of one ring entry (struct kvm_dirty_gfn).
    public static let entryBytes = MemoryLayout<kvm_dirty_gfn>.stride

    private let ring: Mapping
    private var base: UnsafeMutableRawPointer { ring.base }
    public let entries: Int
    private var fetch = 0

    init(vcpu: borrowing FileDescriptor, bytes: Int) throws(KVMError) {
        let offset = off_t(KVM_DIRTY_LOG_PAGE_OFFSET) * off_t(getpagesize())
        do {
            ring = try Mapping(size: bytes, flags: MAP_SHARED, fd: vcpu, offset: offset, what: "dirty ring, \(bytes) bytes")
        } catch { throw .ioctl(error.call, errno: error.errno) }
        entries = bytes / MemoryLayout<kvm_dirty_gfn>.stride
    }

    /// Collects the entries KVM published since the last harvest, in order, marking each for reset.
    public func harvest(_ body: (_ slot: UInt32, _ page: UInt64) -> Void) -> Int {
        var n = 0
        while true {
            let e = base + (fetch % entries) * MemoryLayout<kvm_dirty_gfn>.stride
            let flags = e.assumingMemoryBound(to: Atomic<UInt32>.self)
            guard flags.pointee.load(ordering: .acquiring) & Self.flagDirty != 0 else { return n }
            let g = e.load(as: kvm_dirty_gfn.self)
            body(g.slot, g.offset)
            flags.pointee.store(Self.flagReset, ordering: .releasing)
            fetch += 1
            n += 1
        }
    }
}

extension KVMVM {
    /// Turns on per-vCPU dirty rings of `bytes` each (a power of two; 16 bytes per entry). Must come
    /// before any vCPU is created. Falls back to nothing: the caller uses the bitmap if this throws.
    public func enableDirtyRing(bytes: Int) throws(KVMError) {
        let max = Int(system.capability(.dirtyLogRing))
        guard max > 0 else { throw .capabilityMissing(KVMCapability.dirtyLogRing.name) }
        guard bytes > 0, bytes & (bytes - 1) == 0, bytes <= max else {
            throw .ioctl("dirty ring of \(bytes) bytes (a power of two up to \(max))", errno: EINVAL)
        }
        try enable(.dirtyLogRing, UInt64(bytes))
        dirtyRingBytes = bytes
    }

    /// KVM_RESET_DIRTY_RINGS until every harvested entry is reset: its page re-protected and its room
    /// freed. KVM stops a reset early when the calling thread has a signal pending (a vCPU kick, on a
    /// vCPU thread that harvests at a ring-full exit) and returns a short count or EINTR; and a reset
    /// cut short this way was seen here to leave harvested pages writable, so the guest's later writes
    /// to them went unlogged (100-150 pages a run). So the kick signal is held off while the reset
    /// runs (a kick also sets immediate_exit, so the next KVM_RUN still returns at once), and the reset
    /// is repeated until it finds nothing left. Callers serialize harvests and resets.
    public func resetDirtyRings() throws(KVMError) {
        var kick = sigset_t(), saved = sigset_t()
        sigemptyset(&kick)
        sigaddset(&kick, KVMVCPU.kickSignal)
        pthread_sigmask(SIG_BLOCK, &kick, &saved)
        defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
        for _ in 0..<100_000 {
            let n = cvmm_ioctl_value(fd.raw, cvmm_KVM_RESET_DIRTY_RINGS, 0)
            if n == 0 { return }
            if n < 0 && errno != EINTR { throw .ioctl("KVM_RESET_DIRTY_RINGS", errno: errno) }
        }
        throw .refused("KVM_RESET_DIRTY_RINGS kept finding entries to reset: the rings are out of step")
    }
}
