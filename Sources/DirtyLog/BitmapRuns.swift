/// Calls `body(start, count)` for every run of consecutive set bits of a word bitmap (or of its words
/// `range`; a run ends at the range's end), a word at a time (an all-dirty GiB is 4096 words and one
/// call, not 262,144).
@inlinable
public func forEachRun(_ bitmap: [UInt64], words range: Range<Int>? = nil, _ body: (UInt64, UInt64) -> Void) {
    let words = range?.upperBound ?? bitmap.count
    /// The first bit at or after `from` whose value is `set`, or words * 64.
    func next(_ set: Bool, from: Int) -> Int {
        var w = from >> 6
        guard w < words else { return words * 64 }
        var word = (set ? bitmap[w] : ~bitmap[w]) & (~0 << UInt64(from & 63))
        while word == 0 {
            w += 1
            guard w < words else { return words * 64 }
            word = set ? bitmap[w] : ~bitmap[w]
        }
        return w * 64 + word.trailingZeroBitCount
    }
    var i = (range?.lowerBound ?? 0) * 64
    while true {
        let start = next(true, from: i)
        guard start < words * 64 else { return }
        let end = next(false, from: start)
        body(UInt64(start), UInt64(end - start))
        i = end
    }
}
