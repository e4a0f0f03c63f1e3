import Synchronization

/// One bit per 4 KiB page of a memslot, in 64-bit words: bit i of word w is page 64w + i (the
/// KVM_GET_DIRTY_LOG layout). Any thread marks pages with an atomic OR; a harvest swaps each word to
/// zero, so a page marked concurrently with a harvest is reported by it or by the next one, never lost.
public final class DirtyBitmap: @unchecked Sendable {   // words are atomics in raw memory
    public let pages: UInt64
    public let wordCount: Int
    @usableFromInline let words: UnsafeMutablePointer<Atomic<UInt64>>

    public init(pages: UInt64) {
        self.pages = pages
        wordCount = Int((pages + 63) / 64)
        words = .allocate(capacity: max(wordCount, 1))
        for i in 0..<max(wordCount, 1) { (words + i).initialize(to: Atomic(0)) }
    }

    deinit { words.deallocate() }

    /// The atomic words themselves, for a writer that ORs whole masks (valid while the bitmap lives).
    public var atomicWords: UnsafeMutablePointer<Atomic<UInt64>> { words }

    /// Marks `page` dirty. Release ordering: whoever harvests the bit also sees the write before it.
    @inlinable @inline(__always)
    public func set(_ page: UInt64) {
        assert(page < pages, "page \(page) outside a bitmap of \(pages) pages")
        let bit: UInt64 = 1 << (page & 63)
        let w = Int(truncatingIfNeeded: page >> 6)
        // Skip the read-modify-write when already set: re-dirtying a dirty page stays a plain load.
        if words[w].load(ordering: .relaxed) & bit == 0 {
            words[w].bitwiseOr(bit, ordering: .releasing)
        }
    }

    /// Marks pages [first, first + count) dirty.
    public func set(first: UInt64, count: UInt64) {
        precondition(first + count <= pages, "pages \(first)..<\(first + count) outside a bitmap of \(pages) pages")
        var p = first
        let end = first + count
        while p < end {
            let w = Int(p >> 6), lo = p & 63
            let n = min(64 - lo, end - p)
            let mask = n == 64 ? ~UInt64(0) : ((1 << n) - 1) << lo
            words[w].bitwiseOr(mask, ordering: .releasing)
            p += n
        }
    }

    public func isSet(_ page: UInt64) -> Bool {
        words[Int(page >> 6)].load(ordering: .acquiring) & (1 << (page & 63)) != 0
    }

    /// Moves every set bit into `out` (OR'd in, `wordCount` words) and clears it here.
    /// Returns how many pages were dirty.
    @discardableResult
    public func harvest(into out: inout [UInt64]) -> Int {
        if out.count < wordCount { out += [UInt64](repeating: 0, count: wordCount - out.count) }
        var n = 0
        for i in 0..<wordCount where words[i].load(ordering: .relaxed) != 0 {
            let w = words[i].exchange(0, ordering: .acquiring)
            out[i] |= w
            n += w.nonzeroBitCount
        }
        return n
    }

    /// A copy of the bits, leaving them set.
    public func snapshot() -> [UInt64] {
        (0..<wordCount).map { words[$0].load(ordering: .acquiring) }
    }

    /// ORs the bits into `out` (`wordCount` words), leaving them set: a get under manual protect,
    /// which keeps reporting a page until a clear names it.
    public func copy(into out: inout [UInt64]) {
        if out.count < wordCount { out += [UInt64](repeating: 0, count: wordCount - out.count) }
        for i in 0..<wordCount { out[i] |= words[i].load(ordering: .acquiring) }
    }

    /// Clears the pages `bitmap` names, its bit 0 being page `firstPage` (a multiple of 64); pages
    /// beyond this bitmap are ignored. A page marked again after this is reported again.
    public func clear(bitmap: [UInt64], firstPage: UInt64 = 0) {
        precondition(firstPage % 64 == 0, "clear must start at a multiple of 64 pages")
        let first = Int(firstPage >> 6)
        for (i, w) in bitmap.enumerated() where w != 0 && first + i < wordCount {
            if words[first + i].load(ordering: .relaxed) & w != 0 {
                words[first + i].bitwiseAnd(~w, ordering: .acquiring)
            }
        }
    }

    /// Pages currently marked.
    public var count: Int { (0..<wordCount).reduce(0) { $0 + words[$1].load(ordering: .relaxed).nonzeroBitCount } }

    /// Marks the pages `bitmap` names (bit i of word w = page 64w + i; pages beyond this bitmap are ignored).
    public func set(bitmap: [UInt64]) {
        for (i, w) in bitmap.prefix(wordCount).enumerated() where w != 0 {
            let valid = i == wordCount - 1 && pages % 64 != 0 ? (UInt64(1) << (pages % 64)) - 1 : ~UInt64(0)
            words[i].bitwiseOr(w & valid, ordering: .releasing)
        }
    }
}

/// Calls `body` with the index of every set bit of a word bitmap, in order.
@inlinable
public func forEachSetBit(_ bitmap: [UInt64], _ body: (UInt64) -> Void) {
    for (w, word) in bitmap.enumerated() {
        var bits = word
        while bits != 0 {
            body(UInt64(w) << 6 | UInt64(bits.trailingZeroBitCount))
            bits &= bits - 1
        }
    }
}
