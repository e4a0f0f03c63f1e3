import CVMMSys
import Glibc
import HostSystem
import Synchronization

/// Guest RAM whose absent pages fault to this process instead of reading as zeros (userfaultfd in
/// missing mode over every slot): post-copy and lazy restore put each page in place on first touch.
/// A thread touching an absent page, a vCPU in KVM_RUN or a soft vCPU alike, sleeps until `place`
/// or `placeZeros` fills it. Unregistered (every sleeper woken to read zeros) and closed on deinit or
/// `release()`.
public final class MissingPages: @unchecked Sendable {   // the fd is used from several threads; the kernel serializes it
    public let ram: GuestRAM
    private let uffd: FileDescriptor
    private var fd: Int32 { uffd.raw }
    /// Bytes placed at once: the host page of the backing (a hugetlb page faults and fills whole).
    public let granule: UInt64
    /// Cleared once: `release` may race with itself (a failing thread, `cancel`, deinit).
    private let registered = Atomic<Bool>(true)
    /// Zeros one granule long, for backings UFFDIO_ZEROPAGE does not serve (hugetlb).
    private let zeroMapping: Mapping
    /// Readable once `wake` was called: ends a `waitForFaults` at once rather than at its timeout.
    private let wakeEvent: FileDescriptor
    private let zeros: UnsafeMutableRawPointer?

    /// Registers every slot of `ram`. Pages present now stay; absent ones fault from here on.
    public init(ram: GuestRAM) throws(GuestMemoryError) {
        self.ram = ram
        granule = ram.backing == .thp ? PageSize.bytes4K : ram.backing.hostPageSize.bytes
        uffd = try Self.open()
        let event = cvmm_eventfd()
        guard event >= 0 else { throw .systemCall("eventfd", errno: errno) }
        wakeEvent = FileDescriptor(owning: event)
        // Anonymous memory reads as zeros without being allocated (one granule, whatever the backing).
        do {
            zeroMapping = try Mapping(size: Int(granule), protection: PROT_READ, flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, what: "zeros")
        } catch { throw .systemCall(error.call, errno: error.errno) }
        zeros = ram.backing == .hugetlb2M || ram.backing == .hugetlb1G ? zeroMapping.base : nil
        for (i, m) in ram.slots.enumerated() {
            let e = cvmm_uffd_register(uffd.raw, UInt64(UInt(bitPattern: m.pointer)), m.size)
            guard e == 0 else {
                for m in ram.slots.prefix(i) { _ = cvmm_uffd_unregister(uffd.raw, UInt64(UInt(bitPattern: m.pointer)), m.size) }
                throw .systemCall("UFFDIO_REGISTER(slot \(i), \(formatBytes(m.size)), \(ram.backing))", errno: e)
            }
        }
    }

    /// A userfaultfd handling kernel-mode faults too (KVM's).
    private static func open() throws(GuestMemoryError) -> FileDescriptor {
        var fd: Int32 = -1
        let e = cvmm_uffd_open(&fd)
        guard e == 0 else {
            throw .systemCall(e == EPERM ? "userfaultfd (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)" : "userfaultfd", errno: e)
        }
        return FileDescriptor(owning: fd)
    }

    /// Throws why this process cannot have guest pages fault to it, if it cannot.
    public static func check() throws(GuestMemoryError) { _ = try open() }

    deinit { release() }

    /// Stops faulting: every page still absent reads as zeros from now on, and every thread
    /// sleeping on one wakes. Repeating it does nothing.
    public func release() {
        guard registered.exchange(false, ordering: .acquiringAndReleasing) else { return }
        for m in ram.slots { _ = cvmm_uffd_unregister(fd, UInt64(UInt(bitPattern: m.pointer)), m.size) }
    }

    /// Fills `count` RAM pages from `page` (one slot, whole granules) with `bytes` and wakes whoever
    /// waits on them. False if something was placed there first (the pages are left as they are).
    @discardableResult
    public func place(page: UInt64, count: UInt64, from bytes: UnsafeRawPointer) throws(GuestMemoryError) -> Bool {
        let e = cvmm_uffd_copy(fd, address(page), bytes, count << PageSize.shift4K)
        if e == EEXIST { return false }
        guard e == 0 else { throw .systemCall("UFFDIO_COPY(page \(page), \(count) pages)", errno: e) }
        return true
    }

    /// Fills `count` RAM pages from `page` (one slot, whole granules) with zeros; false if something
    /// was placed there first.
    @discardableResult
    public func placeZeros(page: UInt64, count: UInt64) throws(GuestMemoryError) -> Bool {
        if let zeros {
            var p = page
            var placed = true
            let step = granule >> PageSize.shift4K
            while p < page + count {
                placed = try place(page: p, count: step, from: zeros) && placed
                p += step
            }
            return placed
        }
        let e = cvmm_uffd_zeropage(fd, address(page), count << PageSize.shift4K)
        if e == EEXIST { return false }
        guard e == 0 else { throw .systemCall("UFFDIO_ZEROPAGE(page \(page), \(count) pages)", errno: e) }
        return true
    }

    /// Waits up to `timeout` seconds for faults and returns the RAM pages they touched, in the order
    /// they came (a page may come more than once: several threads, or a retried fault); empty when
    /// none came.
    public func waitForFaults(timeout: Double) throws(GuestMemoryError) -> [UInt64] {
        var p = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeEvent.raw, events: Int16(POLLIN), revents: 0)]
        let rc = poll(&p, 2, Int32(timeout * 1000))
        if rc < 0 && errno != EINTR { throw .systemCall("poll(userfaultfd)", errno: errno) }
        guard rc > 0, p[1].revents == 0 else { return [] }
        var addresses = [UInt64](repeating: 0, count: 64)
        let n = addresses.withUnsafeMutableBufferPointer { cvmm_uffd_read_faults(fd, $0.baseAddress, 64) }
        guard n >= 0 else { throw .systemCall("read(userfaultfd)", errno: -n) }
        return addresses.prefix(Int(n)).compactMap(page(at:))
    }

    /// Ends every `waitForFaults`, now and from now on, at once (with no faults): whoever serves
    /// the faults is stopping and should not wait out its poll.
    public func wake() {
        var one: UInt64 = 1
        _ = write(wakeEvent.raw, &one, 8)
    }

    /// The RAM page at host address `a`, if it lies in guest RAM.
    public func page(at a: UInt64) -> UInt64? {
        for (s, m) in ram.slots.enumerated() {
            let base = UInt64(UInt(bitPattern: m.pointer))
            if a >= base && a < base + m.size { return ram.firstPage[s] + ((a - base) >> PageSize.shift4K) }
        }
        return nil
    }

    private func address(_ page: UInt64) -> UInt64 { UInt64(UInt(bitPattern: ram.pointer(page: page))) }
}
