import Foundation
import GuestMemory

/// One guest access.
@frozen
public struct Access: Equatable, Sendable {
    public var gpa: GPA
    public var isWrite: Bool
    @inlinable public init(gpa: GPA, isWrite: Bool) { self.gpa = gpa; self.isWrite = isWrite }
}

/// The deterministic access stream of one vCPU. Integer-only per access (the zipf table is built
/// once), so the KVM guest program can run the identical sequence:
///
/// ```
/// state  = seed ^ (0x9E3779B97F4A7C15 * (vcpu + 1)), or 1 if that is 0
/// next() = xorshift64*: x ^= x >> 12; x ^= x << 25; x ^= x >> 27; return x * 0x2545F4914F6CDD1D
/// per access: r = next(); w = next()
///   page   = sequential: cursor / 4096 (cursor advances by size, wraps at ws; vCPU i starts at
///                        page floor(frac(i * 0.6180339887) * pages), so vCPUs sweep apart)
///            uniform:    hi32(r) * pages >> 32
///            zipf:       b = hi32(r) >> 20 (12 bits); lo = Z[b]; n = max(Z[b+1] - lo, 1); lo + lo32(r) * n >> 32
///            hotcold:    hot = max(1, pages * fraction); if hi32(r) < P: lo32(r) * hot >> 32
///                        else hot + lo32(r) * (pages - hot) >> 32
///   offset = sequential: cursor % 4096, else (w & 0xFFF) & ~(size - 1)
///   write  = hi32(w) < writeThreshold      (writeThreshold = fraction * 2^32)
/// counter (no random numbers): page = cursor % pages, word = vcpu % 512; expect cursor / pages, then
///   store that + 1; cursor advances by one.
/// ```
public struct WorkloadGenerator: Sendable {
    public let spec: WorkloadSpec
    @usableFromInline var state: UInt64
    @usableFromInline var cursor: UInt64 = 0
    @usableFromInline let pages: UInt64
    @usableFromInline let writeThreshold: UInt64
    @usableFromInline let hotPages: UInt64
    @usableFromInline let hotThreshold: UInt64
    @usableFromInline let zipf: [UInt32]
    @usableFromInline let kind: UInt8 // 0 sequential, 1 uniform, 2 zipf, 3 hot/cold, 5 counter
    @usableFromInline let offsetMask: UInt64
    /// The counter pattern's word in each page (byte offset): one per vCPU.
    public let counterOffset: UInt64

    /// Buckets of the zipf inverse-CDF table.
    public static let zipfBuckets = 4096

    public init(spec: WorkloadSpec, vcpu: Int) {
        self.spec = spec
        let s = spec.seed ^ (0x9E37_79B9_7F4A_7C15 &* UInt64(vcpu + 1))
        state = s == 0 ? 1 : s
        pages = max(1, spec.pages)
        writeThreshold = UInt64(min(1, max(0, spec.writeFraction)) * 4_294_967_296)
        offsetMask = 0xFFF & ~UInt64(spec.accessSize - 1)
        counterOffset = UInt64(vcpu % 512) * 8
        switch spec.pattern {
        case .sequential:
            kind = 0; hotPages = 0; hotThreshold = 0; zipf = []
            // Apart, so each vCPU dirties pages of its own (as threads of a real guest mostly do).
            let fraction = (Double(vcpu) * 0.6180339887).truncatingRemainder(dividingBy: 1)
            cursor = (UInt64(fraction * Double(pages)) % pages) << 12
        case .uniform:
            kind = 1; hotPages = 0; hotThreshold = 0; zipf = []
        case let .zipfian(theta):
            kind = 2; hotPages = 0; hotThreshold = 0
            zipf = Self.zipfTable(pages: pages, theta: theta)
        case let .hotCold(f, p):
            kind = 3
            hotPages = min(pages - 1, max(1, UInt64(Double(pages) * f)))
            hotThreshold = UInt64(p * 4_294_967_296)
            zipf = []
        case .counter:
            kind = 5; hotPages = 0; hotThreshold = 0; zipf = []
        }
    }

    /// Quantile table: entry b is the first page whose cumulative probability reaches b / buckets.
    public static func zipfTable(pages: UInt64, theta: Double) -> [UInt32] {
        var weights = [Double](repeating: 0, count: Int(pages))
        var total = 0.0
        for k in 0..<Int(pages) {
            weights[k] = 1 / pow(Double(k + 1), theta)
            total += weights[k]
        }
        var table = [UInt32](repeating: UInt32(pages), count: zipfBuckets + 1)
        var cumulative = 0.0
        var b = 0
        for k in 0..<Int(pages) {
            cumulative += weights[k] / total
            while b < zipfBuckets && Double(b) / Double(zipfBuckets) <= cumulative {
                table[b] = UInt32(k)
                b += 1
            }
        }
        while b < zipfBuckets { table[b] = UInt32(pages - 1); b += 1 }
        table[zipfBuckets] = UInt32(pages)
        return table
    }

    // The generator's constants, for a guest program that runs the same stream (see the KVM backend).
    public var kindCode: UInt8 { kind }
    public var pageCount: UInt64 { pages }
    public var writeLimit: UInt64 { writeThreshold }
    public var accessOffsetMask: UInt64 { offsetMask }
    public var hotPageCount: UInt64 { hotPages }
    public var hotLimit: UInt64 { hotThreshold }
    public var initialState: UInt64 { state }
    public var initialCursor: UInt64 { cursor }
    /// The zipf table padded to its full size (zeros for other patterns).
    public var zipfQuantiles: [UInt32] { zipf.isEmpty ? [UInt32](repeating: 0, count: Self.zipfBuckets + 1) : zipf }

    /// Where the stream stands: enough to continue it elsewhere (a migrated vCPU).
    /// Set from a saved state, which may come from a peer: a zero state (xorshift's fixed point) and
    /// a sequential cursor outside the working set or between accesses are brought back in, so no
    /// access leaves the working set or crosses a page.
    public var position: (state: UInt64, cursor: UInt64) {
        get { (state, cursor) }
        set {
            state = newValue.state == 0 ? 1 : newValue.state
            cursor = kind == 0 ? (newValue.cursor % spec.workingSet) & ~UInt64(spec.accessSize - 1) : newValue.cursor
        }
    }

    @inlinable @inline(__always)
    public mutating func nextRandom() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }

    public var isCounter: Bool { kind == 5 }

    /// The counter pattern's next access: the word to check and the value it must hold.
    @inlinable @inline(__always)
    public mutating func nextCounter() -> (gpa: GPA, expected: UInt64) {
        let page = cursor % pages
        let expected = cursor / pages
        cursor &+= 1
        return (spec.base + ((page << 12) | counterOffset), expected)
    }

    @inlinable @inline(__always)
    public mutating func next() -> Access {
        let r = nextRandom()
        let w = nextRandom()
        let hi = r >> 32, lo = r & 0xFFFF_FFFF
        var offset = (w & 0xFFF) & offsetMask
        let page: UInt64
        switch kind {
        case 0:
            page = cursor >> 12
            offset = cursor & 0xFFF
            cursor &+= UInt64(spec.accessSize)
            if cursor >= spec.workingSet { cursor = 0 }
        case 1:
            page = (hi &* pages) >> 32
        case 2:
            let b = Int(truncatingIfNeeded: hi >> 20)
            let first = UInt64(zipf[b])
            let n = max(UInt64(zipf[b + 1]) &- first, 1)
            page = min(first &+ ((lo &* n) >> 32), pages &- 1)
        default:
            if hi < hotThreshold {
                page = (lo &* hotPages) >> 32
            } else {
                page = hotPages &+ ((lo &* (pages &- hotPages)) >> 32)
            }
        }
        return Access(gpa: spec.base + ((page << 12) | offset), isWrite: (w >> 32) < writeThreshold)
    }
}
