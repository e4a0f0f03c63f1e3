import Glibc
import GuestMemory
import Stage2
import Workload

/// Why a vCPU left guest mode for the VMM.
public enum VCPUExit: Equatable, Sendable, CustomStringConvertible {
    /// An access to a guest-physical address no memslot holds (device emulation). `value` is set for writes.
    case mmio(GPA, AccessKind, size: Int, value: UInt64?)
    /// A write to a read-only memslot.
    case readOnlyWrite(GPA, slot: Int, size: Int, value: UInt64)
    /// A permission fault the MMU could not resolve.
    case permission(GPA, AccessKind, Descriptor)
    /// The vCPU's dirty ring is full; it waits for the VMM to harvest and reset the rings.
    case dirtyRingFull
    /// A nested guest's (L2's) access that L1's table does not map: reflected to L1.
    case nestedFault(lpid: Int, GPA, AccessKind)
    /// The access was abandoned because the VM is stopping while its fault kept retrying
    /// (an invalidation of the page had not ended), as KVM_RUN returns EINTR.
    case interrupted(GPA, AccessKind)

    public var description: String {
        switch self {
        case let .mmio(g, a, s, v): return "MMIO \(a) of \(s) bytes at \(g)" + (v.map { " value 0x" + String($0, radix: 16) } ?? "")
        case let .readOnlyWrite(g, slot, s, _): return "write of \(s) bytes to read-only slot \(slot) at \(g)"
        case let .permission(g, a, d): return "permission fault: \(a) at \(g) (leaf \(d))"
        case let .interrupted(g, a): return "\(a) at \(g) interrupted: the VM is stopping"
        case .dirtyRingFull: return "dirty ring full"
        case let .nestedFault(l, g, a): return "nested guest \(l): \(a) at L2 \(g) not mapped by L1"
        }
    }
}

/// The VMM's side of an exit: returns the value a read sees (ignored for writes).
public typealias ExitHandler = @Sendable (VCPUExit) -> UInt64

/// A software vCPU: every guest load and store goes TLB -> hardware walk -> stage-2 fault, and lands
/// in real host memory. Its methods run on the vCPU's own thread, between `enterGuest` and `exitGuest`.
public final class SoftVCPU: @unchecked Sendable {   // its methods run on the vCPU's own thread; others reach it only through the TLB mailbox
    public let index: Int
    public let mmu: Stage2MMU
    public let tlb = SoftTLB()
    /// This vCPU's dirty ring (used when a slot logs with the ring strategy).
    public let ring: DirtyRing
    /// For a nested guest's vCPU: the shadow MMU it translates through (L2 GPAs), instead of L0's.
    public let nested: ShadowMMU?
    // Both only on the vCPU's thread (and read once it stopped): no exclusivity check per access.
    @exclusivity(unchecked) public var cache: TableCache
    @exclusivity(unchecked) public var stats = VCPUStats()
    /// Handles exits; by default reads from unclaimed addresses return all ones and writes are dropped.
    @exclusivity(unchecked) public var exitHandler: ExitHandler = { _ in ~0 }
    /// The last exit taken, for tests and reports.
    @exclusivity(unchecked) public private(set) var lastExit: VCPUExit?
    /// The run's control while `run` is going: a fault that keeps retrying parks or gives up through it.
    private var control: RunControl?

    public init(index: Int, mmu: Stage2MMU, ringCapacity: Int = 4096, nested: ShadowMMU? = nil) {
        self.index = index
        self.mmu = mmu
        self.nested = nested
        self.cache = TableCache(allocator: mmu.allocator)
        self.ring = DirtyRing(capacity: ringCapacity)
        (nested?.tlbs ?? mmu.tlbs).register(tlb)
        mmu.register(ring)
    }

    deinit {
        (nested?.tlbs ?? mmu.tlbs).unregister(tlb)
        mmu.unregister(ring)
        cache.drain()
    }

    public func enterGuest() { tlb.enterGuest() }
    public func exitGuest() {
        tlb.exitGuest()
        stats.tlbFlushes = tlb.flushes
        stats.tlbEntriesDropped = tlb.entriesDropped
    }

    /// Guest load of `size` bytes (1, 2, 4 or 8) at `gpa`.
    @inlinable @inline(__always)
    public func load(_ gpa: GPA, size: Int = 8) -> UInt64 {
        stats.accesses &+= 1
        if let p = tlb.lookup(gpa, Descriptor.read) {
            stats.tlbHits &+= 1
            return Self.read(p, size)
        }
        guard let p = slowPath(gpa, .read) else {
            return exit(gpa, .read, size: size, value: 0)
        }
        return Self.read(p, size)
    }

    /// Guest store of the low `size` bytes of `value` at `gpa`.
    @inlinable @inline(__always)
    public func store(_ gpa: GPA, _ value: UInt64, size: Int = 8) {
        stats.accesses &+= 1
        stats.writes &+= 1
        if let p = tlb.lookup(gpa, Descriptor.write) {
            stats.tlbHits &+= 1
            Self.write(p, value, size)
            return
        }
        guard let p = writeMiss(gpa) else {
            _ = exit(gpa, .write, size: size, value: value)
            return
        }
        Self.write(p, value, size)
    }

    /// A write that missed the TLB. The common case under DBM logging, a first write to a
    /// writable-clean page of the region walked last, is handled here in a few instructions: the frame
    /// is logged and the TLB gets W (see dirtyBitModifier). Anything else takes the slow path.
    @usableFromInline @inline(never)
    func writeMiss(_ gpa: GPA) -> UnsafeMutableRawPointer? {
        assert(tlb.isInGuest, "guest accesses run between enterGuest() and exitGuest()")
        let clean = Descriptor.dbm | Descriptor.read | Descriptor.accessFlag
        if nested == nil, let t = tlb.cachedWalk(gpa), t.leaf.raw & (clean | Descriptor.write) == clean {
            stats.walks &+= 1
            tlb.logDirty(gpa.gfn)
            let host = t.hostPage(for: gpa)
            tlb.insert(gpa.gfn, host: host, permissions: t.leaf.permissions.union(.write))
            return (host + gpa.pageOffset).pointer
        }
        return slowPath(gpa, .write)
    }

    @inlinable @inline(__always)
    static func read(_ p: UnsafeMutableRawPointer, _ size: Int) -> UInt64 {
        switch size {
        case 8: return p.load(as: UInt64.self)
        case 4: return UInt64(p.load(as: UInt32.self))
        case 2: return UInt64(p.load(as: UInt16.self))
        default: return UInt64(p.load(as: UInt8.self))
        }
    }

    @inlinable @inline(__always)
    static func write(_ p: UnsafeMutableRawPointer, _ v: UInt64, _ size: Int) {
        switch size {
        case 8: p.storeBytes(of: v, as: UInt64.self)
        case 4: p.storeBytes(of: UInt32(truncatingIfNeeded: v), as: UInt32.self)
        case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: v), as: UInt16.self)
        default: p.storeBytes(of: UInt8(truncatingIfNeeded: v), as: UInt8.self)
        }
    }

    /// TLB miss: walk, fill the TLB, or take the fault outside guest mode and try again.
    /// Returns nil when the access must exit to the VMM (the exit is in `pendingExit`).
    @usableFromInline @inline(never)
    func slowPath(_ gpa: GPA, _ access: AccessKind) -> UnsafeMutableRawPointer? {
        assert(tlb.isInGuest, "guest accesses run between enterGuest() and exitGuest()")
        let required = access.required.rawValue
        if let p = tlb.lookupBlock(gpa, SoftTLB.bits(access.required)) {
            stats.blockTLBHits &+= 1
            return p
        }
        var retries = 0
        while true {
            stats.walks &+= 1
            if let t = nested.map({ $0.translate(gpa) }) ?? walk(gpa),
               t.leaf.raw & required == required || dirtyBitModifier(gpa, t, access) {
                if !t.leaf.has(Descriptor.accessFlag) {
                    _ = t.entry.compareExchange(t.leaf, t.leaf.setting(Descriptor.accessFlag))
                }
                let host = t.hostPage(for: gpa)
                // After a DBM update the leaf (as read) lacks W; the entry we cached now has it.
                let permissions = access == .write ? t.leaf.permissions.union(.write) : t.leaf.permissions
                if t.level < 3 {
                    tlb.insertBlock(gpa, host: host, permissions: permissions)
                } else {
                    tlb.insert(gpa.gfn, host: host, permissions: permissions)
                }
                return (host + gpa.pageOffset).pointer
            }
            stats.faults &+= 1
            let wasInGuest = tlb.isInGuest
            tlb.exitGuest()
            defer { if wasInGuest { tlb.enterGuest() } }
            let outcome: FaultOutcome
            if let nested {
                switch nested.handleFault(gpa, access, cache: &cache) {
                case let .mapped(size): outcome = .mapped(size)
                case .retry: outcome = .retry
                case let .reflect(g, a): pendingExit = .nestedFault(lpid: nested.lpid, g, a); return nil
                // The L1 address behind the L2 one is not plain L1 RAM: L0's own outcome for it.
                case let .l1(o): outcome = o
                }
            } else {
                outcome = mmu.handleFault(gpa, access, cache: &cache, ring: ring)
            }
            switch outcome {
            case let .mapped(size): stats.mapped[size.rawValue] &+= 1
            case .retry:
                // An invalidation or a break-before-make is in flight: let its owner run, and do not
                // keep a pause or a stop waiting on us meanwhile.
                retries += 1
                if retries > 8 { sched_yield() }
                if retries & 63 == 0, stopping(gpa, access) { return nil }
            case let .mmio(g, a): pendingExit = .mmio(g, a, size: 0, value: nil); return nil
            case let .readOnlyWrite(g, slot): pendingExit = .readOnlyWrite(g, slot: slot, size: 0, value: 0); return nil
            case let .permission(g, a, d): pendingExit = .permission(g, a, d); return nil
            case .dirtyRingFull:
                // Exit to the VMM (which may harvest and reset), then wait for room.
                stats.ringFullExits &+= 1
                lastExit = .dirtyRingFull
                _ = exitHandler(.dirtyRingFull)
                // Wait a little, then fault again: logging may have stopped meanwhile.
                if !ring.waitForRoom(timeout: 0.05), stopping(gpa, access) { return nil }
            }
        }
    }

    /// While a fault keeps retrying or waiting: park for a pause; for a stop, abandon the access
    /// (true, with the exit set), so neither waits on us.
    private func stopping(_ gpa: GPA, _ access: AccessKind) -> Bool {
        guard let control else { return false }
        if control.stopRequested {
            pendingExit = .interrupted(gpa, access)
            return true
        }
        if control.pauseRequested { control.parkWhilePaused() }
        return false
    }

    /// This vCPU's MMU walk for `gpa`: through its paging-structure cache when the region matches.
    @inline(__always)
    func walk(_ gpa: GPA) -> Translation? {
        if let t = tlb.cachedWalk(gpa) { return t }
        guard let t = mmu.translate(gpa) else { return nil }
        tlb.rememberWalk(gpa, t)
        return t
    }

    /// The hardware dirty-bit modifier: a write to a writable-clean (DBM) 4 KiB leaf needs no fault.
    /// The page goes into this vCPU's dirty log and only its TLB entry gets W (as Intel PML logs a
    /// GPA): a plain store, where setting W in the leaf took a locked compare-and-swap that waited
    /// for the previous page's store to drain. A nested guest's leaf is its shadow's, set by
    /// compare-and-swap. True if the write may go ahead.
    @inline(__always)
    func dirtyBitModifier(_ gpa: GPA, _ t: Translation, _ access: AccessKind) -> Bool {
        guard access == .write, t.leaf.has(Descriptor.dbm), t.leaf.has(Descriptor.read) else { return false }
        if nested == nil {
            tlb.logDirty(gpa.gfn)
            return true
        }
        return t.entry.compareExchange(t.leaf, t.leaf.setting(Descriptor.write | Descriptor.accessFlag))
    }

    @exclusivity(unchecked) @usableFromInline var pendingExit: VCPUExit?

    /// Leaves guest mode to let the VMM handle the access, then returns what a read sees.
    @usableFromInline @inline(never)
    func exit(_ gpa: GPA, _ access: AccessKind, size: Int, value: UInt64) -> UInt64 {
        var e = pendingExit ?? .mmio(gpa, access, size: size, value: nil)
        switch e {
        case .mmio: e = .mmio(gpa, access, size: size, value: access == .write ? value : nil); stats.mmioExits &+= 1
        case let .readOnlyWrite(_, slot, _, _): e = .readOnlyWrite(gpa, slot: slot, size: size, value: value); stats.readOnlyExits &+= 1
        case .permission: stats.permissionExits &+= 1
        case .interrupted, .dirtyRingFull: stats.interruptedExits &+= 1
        case .nestedFault: stats.permissionExits &+= 1
        }
        pendingExit = nil
        lastExit = e
        let wasInGuest = tlb.isInGuest
        tlb.exitGuest()
        defer { if wasInGuest { tlb.enterGuest() } }
        return exitHandler(e)
    }

    /// Where this vCPU's workload stands, updated at every safe-point batch: what a migration carries
    /// to continue the same stream on another VM.
    public var position = VCPUPosition()

    /// How the guest maps its workload's (linear) addresses to GPAs, as its page tables would: the
    /// identity, unless its RAM spans several slots.
    public var linearLayout = RAMLayout.identity

    /// Runs `workload` until it ends or `control` stops it. Stores write a per-vCPU sequence number
    /// (`index << 48 | n`), so a test can tell which store landed last. `from` continues a stream
    /// where another vCPU (a migrated one) left it.
    public func run(_ workload: WorkloadSpec, control: RunControl, from: VCPUPosition? = nil) {
        var gen = WorkloadGenerator(spec: workload, vcpu: index)
        if let from { gen.position = (from.state, from.cursor) }
        let size = workload.accessSize
        let counting = gen.isCounter
        let layout = linearLayout
        let start = monotonicNanos()
        var deadline = UInt64.max
        var limit = UInt64.max
        switch workload.stop {
        case let .count(n): limit = n
        case let .duration(s): deadline = start &+ UInt64(s * 1e9)
        }
        let batch: UInt64 = 256
        var done: UInt64 = from?.done ?? 0
        var seq = from?.seq ?? UInt64(index) << 48
        // Saved as it stands before the first access, too (a guest started paused, then migrated).
        position = VCPUPosition(state: gen.position.state, cursor: gen.position.cursor, seq: seq, done: done)
        // A continued stream is paced from where it resumed, not from its first access.
        var pacer = Pacer(vcpu: index, start: start, deadline: deadline, rate: workload.rate, firstAccess: done)
        self.control = control
        defer { self.control = nil }
        // Started paused: not one access before the resume.
        if control.pauseRequested { control.parkWhilePaused() }
        enterGuest()
        while done < limit && !control.stopRequested {
            let n = min(batch, limit - done)
            if counting {
                for _ in 0..<n {
                    let (linear, expected) = gen.nextCounter()
                    let gpa = layout.gpa(linear: linear.raw)
                    if load(gpa, size: 8) != expected { stats.mismatches &+= 1 }
                    store(gpa, expected &+ 1, size: 8)
                    tlb.safePoint()
                }
            } else {
                for _ in 0..<n {
                    let a = gen.next()
                    let gpa = layout.gpa(linear: a.gpa.raw)
                    if a.isWrite {
                        seq &+= 1
                        store(gpa, seq, size: size)
                    } else {
                        _ = load(gpa, size: size)
                    }
                    tlb.safePoint()
                }
            }
            done &+= n
            position = VCPUPosition(state: gen.position.state, cursor: gen.position.cursor, seq: seq, done: done)
            if control.stopRequested { break }
            if control.pauseRequested {
                exitGuest()
                control.parkWhilePaused()
                stats.pauses &+= 1
                if control.stopRequested { break }
                enterGuest()
            }
            let now = monotonicNanos()
            if now >= deadline { break }
            pacer.pace(now: now, done: done, control: control) { sleep in
                exitGuest()
                sleep()
                enterGuest()
            }
        }
        exitGuest()
        stats.nanoseconds = monotonicNanos() - start
    }
}

/// A software vCPU's place in its workload stream.
public struct VCPUPosition: Sendable, Equatable, Codable {
    public var state: UInt64 = 0
    public var cursor: UInt64 = 0
    public var seq: UInt64 = 0
    public var done: UInt64 = 0
    public init(state: UInt64 = 0, cursor: UInt64 = 0, seq: UInt64 = 0, done: UInt64 = 0) {
        self.state = state; self.cursor = cursor; self.seq = seq; self.done = done
    }
}
