import GuestMemory
import Synchronization

/// One reverse-map entry: a shadow leaf of nested guest `lpid` at L2 frame `l2GFN`, of `size`, that
/// maps the L1 frame whose rmap holds it. 64 bits: LPID in bits 63-52, the L2 GFN in bits 51-12, the
/// leaf size in bits 2-1, and bit 0 the single-entry flag when stored inline.
@frozen
public struct RmapEntry: Hashable, Sendable {
    public let raw: UInt64

    public init(lpid: Int, l2GFN: GFN, size: PageSize) {
        precondition((1..<4096).contains(lpid), "LPIDs are 1...4095 (0 is the host)")
        precondition(l2GFN.raw < 1 << 40, "L2 frame beyond 40 bits")
        raw = UInt64(lpid) << 52 | l2GFN.raw << 12 | UInt64(size.rawValue) << 1
    }

    init(raw: UInt64) { self.raw = raw & ~1 }

    public var lpid: Int { Int(raw >> 52) }
    public var l2GFN: GFN { GFN((raw >> 12) & ((1 << 40) - 1)) }
    public var size: PageSize { PageSize(rawValue: Int((raw >> 1) & 3))! }
}

/// The rmap of one L0 memslot (L1 memory): per L1 frame, empty (0), one entry inline (flag bit 0
/// set), or a list (the value is the list's index + 1, shifted left by one). Adding an entry that is
/// already there does nothing, so repeated faults cannot grow it without bound.
public final class NestedRmap: @unchecked Sendable {   // lists under `lock`; heads are atomics in raw memory
    public let pages: UInt64
    private let heads: UnsafeMutablePointer<UInt64>
    private var lists: [[RmapEntry]] = []
    private var freeLists: [Int] = []
    private let lock = Mutex<Void>(())

    public init(pages: UInt64) {
        self.pages = pages
        heads = .allocate(capacity: Int(pages))
        heads.initialize(repeating: 0, count: Int(pages))
    }

    deinit { heads.deallocate() }

    /// Adds `e` to frame `frame` unless it is there already. Returns whether it was added.
    @discardableResult
    public func add(_ e: RmapEntry, frame: UInt64) -> Bool {
        lock.withLock { _ in
            let h = heads[Int(frame)]
            if h == 0 {
                heads[Int(frame)] = e.raw | 1
                return true
            }
            if h & 1 != 0 {
                if RmapEntry(raw: h) == e { return false }
                let i = newList([RmapEntry(raw: h), e])
                heads[Int(frame)] = UInt64(i + 1) << 1
                return true
            }
            let i = Int(h >> 1) - 1
            if lists[i].contains(e) { return false }
            lists[i].append(e)
            return true
        }
    }

    /// The entries of a frame.
    public func entries(frame: UInt64) -> [RmapEntry] {
        lock.withLock { _ in entriesLocked(frame) }
    }

    /// Removes and returns every entry of a frame.
    public func takeAll(frame: UInt64) -> [RmapEntry] {
        lock.withLock { _ in
            let out = entriesLocked(frame)
            clearLocked(frame)
            return out
        }
    }

    /// Removes one entry from a frame, if present.
    public func remove(_ e: RmapEntry, frame: UInt64) {
        lock.withLock { _ in
            let h = heads[Int(frame)]
            if h & 1 != 0 {
                if RmapEntry(raw: h) == e { heads[Int(frame)] = 0 }
            } else if h != 0 {
                let i = Int(h >> 1) - 1
                lists[i].removeAll { $0 == e }
                if lists[i].count == 1 {
                    heads[Int(frame)] = lists[i][0].raw | 1
                    freeList(i)
                } else if lists[i].isEmpty {
                    heads[Int(frame)] = 0
                    freeList(i)
                }
            }
        }
    }

    /// Entries over all frames, and bytes used (8 per frame head, plus 8 per list entry).
    public var census: (entries: Int, bytes: Int) {
        lock.withLock { _ in
            var n = 0
            for f in 0..<Int(pages) where heads[f] != 0 { n += heads[f] & 1 != 0 ? 1 : lists[Int(heads[f] >> 1) - 1].count }
            let listBytes = lists.reduce(0) { $0 + $1.count * 8 }
            return (n, Int(pages) * 8 + listBytes)
        }
    }

    private func entriesLocked(_ frame: UInt64) -> [RmapEntry] {
        let h = heads[Int(frame)]
        if h == 0 { return [] }
        if h & 1 != 0 { return [RmapEntry(raw: h)] }
        return lists[Int(h >> 1) - 1]
    }

    private func clearLocked(_ frame: UInt64) {
        let h = heads[Int(frame)]
        if h != 0 && h & 1 == 0 { freeList(Int(h >> 1) - 1) }
        heads[Int(frame)] = 0
    }

    private func newList(_ l: [RmapEntry]) -> Int {
        if let i = freeLists.popLast() { lists[i] = l; return i }
        lists.append(l)
        return lists.count - 1
    }

    private func freeList(_ i: Int) {
        lists[i] = []
        freeLists.append(i)
    }
}
