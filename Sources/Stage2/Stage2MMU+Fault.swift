import Foundation
import DirtyLog
import GuestMemory
import Synchronization

/// How a stage-2 fault was resolved.
public enum FaultOutcome: Equatable, Sendable, CustomStringConvertible {
    /// A leaf of this size now maps the address: retry the access.
    case mapped(PageSize)
    /// Nothing to install (another vCPU won, a break-before-make or an invalidation was in flight,
    /// or the fault was spurious): retry the access.
    case retry
    /// No memslot holds the address: exit to the VMM for device emulation. The host was not touched.
    case mmio(GPA, AccessKind)
    /// A write to a read-only memslot: exit to the VMM.
    case readOnlyWrite(GPA, slot: Int)
    /// A permission the slot does not grant and nothing here can resolve: exit to the VMM.
    case permission(GPA, AccessKind, Descriptor)
    /// The faulting vCPU's dirty ring is full: exit to the VMM and wait for a reset.
    case dirtyRingFull

    public var description: String {
        switch self {
        case let .mapped(s): return "mapped \(s)"
        case .retry: return "retry"
        case let .mmio(g, a): return "MMIO \(a) at \(g)"
        case let .readOnlyWrite(g, s): return "write to read-only slot \(s) at \(g)"
        case let .permission(g, a, d): return "permission fault: \(a) at \(g), leaf \(d)"
        case .dirtyRingFull: return "dirty ring full"
        }
    }
}

/// The fault path: what a vCPU's stage-2 fault maps, and at which size.
extension Stage2MMU {
    /// Resolves a stage-2 fault at `gpa` (KVM's user_mem_abort for the soft backend). The caller is
    /// outside guest mode; `cache` is its per-vCPU table reserve, topped up here before the lock;
    /// `ring` is its dirty ring, used when the slot logs with the ring strategy.
    public func handleFault(_ gpa: GPA, _ access: AccessKind, cache: inout TableCache, ring: DirtyRing? = nil) -> FaultOutcome {
        let seq = invalidateSeq.load(ordering: .acquiring)
        cache.topUp(to: 5 - startLevel)
        faultWindowHook?()
        lock.lockShared()
        defer { lock.unlock() }

        guard let slot = slotTable.lookup(gpa) else { return .mmio(gpa, access) }
        if access == .write && slot.flags.contains(.readOnly) { return .readOnlyWrite(gpa, slot: slot.id) }
        let log = slot.flags.contains(.dirtyLogging) ? dirtyLogs[slot.id] : nil
        let permissions: Permissions = slot.flags.contains(.readOnly) ? [.read, .execute] : .all
        if let t = translate(gpa) {
            // Permission fault, or a spurious one: another vCPU already fixed the leaf.
            if t.leaf.permissions.contains(access.required) { return .retry }
            if let log, access == .write { return loggedWrite(gpa, t, log, &cache, ring) }
            // The slot grants more than the leaf has (made writable again, or logging stopped):
            // relax in place.
            guard permissions.contains(access.required) else { return .permission(gpa, access, t.leaf) }
            // While logging, write permission comes back only through loggedWrite, which records it.
            let grant = log == nil ? permissions : permissions.subtracting(.write)
            let relaxed = t.leaf.setting(grant.rawValue)
            _ = ChangeHook.grant(t.context(gpa), log == nil ? relaxed.clearing(Descriptor.swLogged) : relaxed)
            return .retry
        }

        let tracker = log?.tracker ?? NotLogging()
        let size = Self.mappingSize(for: gpa, in: slot, tracker: tracker)
        let blockStart = gpa.alignedDown(to: size.bytes)
        // An invalidation of any host page the new leaf would map began or completed since we
        // started: our view may be stale.
        let hvaRange = HVARange(start: slot.hva(for: blockStart), size: size.bytes)
        if invalidatesInProgress > 0 && invalidateRange.overlaps(hvaRange) { return .retry }
        if invalidateSeq.load(ordering: .acquiring) != seq { return .retry }

        if access == .write && tracker.usesRings, let ring, ring.isSoftFull { return .dirtyRingFull }
        let (attributes, recordAfter) = tracker.faultLeaf(permissions.rawValue | Descriptor.accessFlag,
                                                          write: access == .write, size: size)
        var v = MapVisitor(start: blockStart, output: slot.hva(for: blockStart), size: size,
                           attributes: attributes, changes: changeHook, cache: cache)
        walk(GPARange(start: blockStart, size: size.bytes), shared: true, &v)
        cache = v.cache
        commit(v.changes)
        if recordAfter, let log { record(GPARange(start: blockStart, size: size.bytes), log, ring) }
        return .mapped(size)
    }

    /// A guest write to a leaf that dirty logging protects. A block is split if the tracker says so (the
    /// written page then faults on its own 4 KiB leaf), else marked and unprotected whole. A 4 KiB page
    /// is marked, then made writable.
    @inline(__always)
    private func loggedWrite(_ gpa: GPA, _ t: Translation, _ log: SlotDirtyLog, _ cache: inout TableCache,
                             _ ring: DirtyRing?) -> FaultOutcome {
        let size = Stage2Geometry.entrySize(t.level)
        let range = GPARange(start: gpa.alignedDown(to: size), size: size)
        if t.level < 3, let split = log.splitOnWrite {
            // Only the path to the written page goes down to 4 KiB; the rest stays in protected blocks.
            var v = SplitVisitor(GPARange(start: gpa.alignedDown(to: PageSize.bytes4K), size: PageSize.bytes4K), to: .size4K,
                                 changes: changeHook, cache: cache, leafSet: split.set, leafClear: split.clear)
            walk(range, shared: true, &v)
            cache = v.cache
            commit(v.changes)
            return .retry
        }
        if log.usesRings, let ring, ring.isSoftFull { return .dirtyRingFull }
        // Writable first, then recorded (as KVM's fast page fault): the guest's write comes after
        // both, and a harvest that takes the record before the leaf turns writable would otherwise
        // re-protect nothing and lose every later write. A DBM leaf is recorded by its own W bit.
        guard ChangeHook.grant(t.context(gpa), t.leaf.setting(Descriptor.write).clearing(Descriptor.swLogged)) else { return .retry }
        if !t.leaf.has(Descriptor.dbm) { record(range, log, ring) }
        return .retry
    }

    /// Marks a range of a logging slot dirty: in the faulting vCPU's ring if the tracker uses rings,
    /// else in the slot bitmap.
    @inline(__always)
    private func record(_ range: GPARange, _ log: SlotDirtyLog, _ ring: DirtyRing?) {
        let first = (range.start - log.slot.gpaRange.start) >> 12
        if log.usesRings, let ring {
            for p in first..<(first + (range.size >> 12)) { ring.push(DirtyRingEntry(slot: log.slot.id, page: p)) }
        } else {
            log.bitmap.set(first: first, count: range.size >> 12)
        }
    }

    /// The largest leaf that may map `gpa`: no larger than the host backing's page, wholly inside the
    /// slot, and with guest and host addresses congruent modulo the size (else a block would map the
    /// wrong host pages: seed 003's force_pte). A logging slot's tracker may ask for less (most map
    /// 4 KiB leaves; block-granular keeps blocks).
    public static func mappingSize(for gpa: GPA, in slot: Memslot, logging: DirtyStrategy? = nil) -> PageSize {
        mappingSize(for: gpa, in: slot, tracker: logging?.tracker ?? NotLogging())
    }

    static func mappingSize(for gpa: GPA, in slot: Memslot, tracker: any DirtyTracker) -> PageSize {
        tracker.mappingSize(hostFit(for: gpa, in: slot))
    }

    /// The largest leaf the backing and the slot's placement allow at `gpa`.
    static func hostFit(for gpa: GPA, in slot: Memslot) -> PageSize {
        var size = slot.backing.hostPageSize
        while size > .size4K {
            let start = gpa.alignedDown(to: size.bytes)
            let fits = start >= slot.gpaRange.start && start + size.bytes <= slot.gpaRange.end
            let congruent = (slot.hvaStart.raw &- slot.gpaRange.start.raw) & (size.bytes - 1) == 0
            if fits && congruent { return size }
            size = PageSize(rawValue: size.rawValue - 1)!
        }
        return .size4K
    }
}
