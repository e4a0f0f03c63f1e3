import Foundation

/// The per-record checksum: a 32-bit fold of four independent 64-bit multiply-rotate lanes over
/// 8-byte words (after xxHash64's round), fast enough (several GB/s) not to limit a migration.
/// It guards against corruption; the authentication, when a key is given, is the MAC.
public struct RecordChecksum {
    private var lanes: (UInt64, UInt64, UInt64, UInt64) = (0x9E37_79B1_85EB_CA87, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x85EB_CA77_C2B2_AE63)
    private var length: UInt64 = 0
    private static let p1: UInt64 = 0x9E37_79B1_85EB_CA87
    private static let p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F

    public init() {}

    @inline(__always) private static func round(_ acc: UInt64, _ w: UInt64) -> UInt64 {
        let x = acc &+ w &* p2
        return ((x << 31) | (x >> 33)) &* p1
    }

    public var value: UInt32 {
        let h = value64
        return UInt32(truncatingIfNeeded: h) ^ UInt32(truncatingIfNeeded: h >> 32)
    }

    /// The lanes folded into 64 bits (a page's hash in the memory digest).
    var value64: UInt64 { Self.avalanche(lanes.0 ^ (lanes.1 &* 3) ^ (lanes.2 &* 5) ^ (lanes.3 &* 7) ^ length) }

    /// Each lane finalized with the length: a 256-bit digest.
    public var finalLanes: [UInt64] {
        [lanes.0, lanes.1, lanes.2, lanes.3].enumerated().map { Self.avalanche($0.element ^ length ^ UInt64($0.offset) &* Self.p1) }
    }

    @inline(__always) private static func avalanche(_ x: UInt64) -> UInt64 {
        var h = x
        h ^= h >> 33; h = h &* p2; h ^= h >> 29; h = h &* p1; h ^= h >> 32
        return h
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        var i = 0
        let n = bytes.count
        var (a, b, c, d) = lanes
        while i + 32 <= n {
            a = Self.round(a, base.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            b = Self.round(b, base.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self))
            c = Self.round(c, base.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self))
            d = Self.round(d, base.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self))
            i += 32
        }
        while i < n {
            a = Self.round(a, UInt64(base.load(fromByteOffset: i, as: UInt8.self)) &+ UInt64(i))
            i += 1
        }
        lanes = (a, b, c, d)
        length &+= UInt64(n)
    }

    public mutating func update(_ bytes: [UInt8]) { bytes.withUnsafeBytes { update($0) } }
    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var c = RecordChecksum()
        c.update(bytes)
        return c.value
    }
}
