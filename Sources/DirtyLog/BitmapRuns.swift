/// Calls `body(start, count)` for every run of consecutive set bits among bits `pages` of a word
/// bitmap (bit i of word w = page 64w + i; a run ends at the range's end), a word at a time (an
/// all-dirty GiB is 4096 words and one call, not 262,144).
@inlinable
public func forEachRun(_ bitmap: UnsafeBufferPointer<UInt64>, pages: Range<UInt64>, _ body: (UInt64, UInt64) -> Void) {
    let endBit = Int(min(pages.upperBound, UInt64(bitmap.count) << 6))
    /// The first bit at or after `from` whose value is `set`, or `endBit`.
    func next(_ set: Bool, from: Int) -> Int {
        guard from < endBit else { return endBit }
        var w = from >> 6
        var word = (set ? bitmap[w] : ~bitmap[w]) & (~0 << UInt64(from & 63))
        while word == 0 {
            w += 1
            guard w << 6 < endBit else { return endBit }
            word = set ? bitmap[w] : ~bitmap[w]
        }
        return min(endBit, w << 6 + word.trailingZeroBitCount)
    }
    var i = Int(pages.lowerBound)
    while true {
        let start = next(true, from: i)
        guard start < endBit else { return }
        let end = next(false, from: start)
        body(UInt64(start), UInt64(end - start))
        i = end
    }
}

/// The same over an array, or over its words `range`.
@inlinable
public func forEachRun(_ bitmap: [UInt64], words range: Range<Int>? = nil, _ body: (UInt64, UInt64) -> Void) {
    let r = range ?? 0..<bitmap.count
    bitmap.withUnsafeBufferPointer { forEachRun($0, pages: UInt64(r.lowerBound) << 6..<UInt64(r.upperBound) << 6, body) }
}

/// A page bitmap held in an array (bit p of word p / 64), as passes, post-copy and restores keep them.
extension Array where Element == UInt64 {
    /// Pages set.
    @inlinable public var pageCount: UInt64 { reduce(0) { $0 + UInt64($1.nonzeroBitCount) } }

    @inlinable public func isSet(_ page: UInt64) -> Bool { self[Int(page >> 6)] & (1 << (page & 63)) != 0 }

    @inlinable public mutating func set(_ page: UInt64) { self[Int(page >> 6)] |= 1 << (page & 63) }

    /// Clears the run of set bits from `page` on, at most `limit` long and while `also` holds for
    /// the page; returns its length (0 if `page` is clear).
    @inlinable
    public mutating func takeRun(from page: UInt64, upTo limit: UInt64, while also: (UInt64) -> Bool = { _ in true }) -> UInt64 {
        var n: UInt64 = 0
        while n < limit, page + n < UInt64(count) << 6, isSet(page + n), also(page + n) {
            self[Int((page + n) >> 6)] &= ~(1 << ((page + n) & 63))
            n += 1
        }
        return n
    }
}
