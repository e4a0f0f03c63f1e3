import Glibc

/// The MMU lock (KVM's mmu_lock as a reader-writer lock): faults and shared walks take it for
/// reading, operations that free structure or change the memslot map take it for writing.
/// Writers are preferred so a stream of faults cannot starve an unmap.
public final class MMULock: @unchecked Sendable {   // a pthread rwlock: synchronization itself
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        // A cache line of its own: faults on every vCPU hit it, and nothing else should share its line.
        lock = UnsafeMutableRawPointer.allocate(byteCount: max(64, MemoryLayout<pthread_rwlock_t>.size), alignment: 64)
            .bindMemory(to: pthread_rwlock_t.self, capacity: 1)
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(lock, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    @inline(__always) public func lockShared() { pthread_rwlock_rdlock(lock) }
    @inline(__always) public func lockExclusive() { pthread_rwlock_wrlock(lock) }
    @inline(__always) public func unlock() { pthread_rwlock_unlock(lock) }

    @inline(__always) public func shared<T>(_ body: () throws -> T) rethrows -> T {
        lockShared()
        defer { unlock() }
        return try body()
    }

    @inline(__always) public func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        lockExclusive()
        defer { unlock() }
        return try body()
    }
}
