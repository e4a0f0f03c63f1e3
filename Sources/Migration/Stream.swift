import Crypto
import Foundation
import GuestMemory

/// The stream's record types (docs/migration-stream.md).
public enum RecordType: UInt8, Sendable {
    case pages = 1
    case state = 2
    case end = 3
}

/// What went wrong in a migration, on either side.
public enum MigrationError: Error, Equatable, CustomStringConvertible {
    case connection(String)
    case timeout(String)
    case badStream(String)
    case digestMismatch
    case refused
    case vm(String)

    public var description: String {
        switch self {
        case let .connection(why): return "connection: \(why)"
        case let .timeout(what): return "timed out: \(what)"
        case let .badStream(why): return "bad migration stream: \(why)"
        case .digestMismatch: return "the destination's memory digest does not match the source's: the guest was not resumed there"
        case .refused: return "the destination refused the guest (see its output)"
        case let .vm(why): return "VM: \(why)"
        }
    }
}

/// The stream header.
public struct StreamHeader: Equatable, Sendable {
    public static let magic = Array("VMMMIGR1".utf8)
    public static let version: UInt32 = 1
    public var memory: UInt64
    public var vcpus: UInt32
    public var backend: UInt8
    public var backing: UInt8
    public var spec: String

    public init(memory: UInt64, vcpus: UInt32, backend: UInt8, backing: UInt8, spec: String) {
        self.memory = memory
        self.vcpus = vcpus
        self.backend = backend
        self.backing = backing
        self.spec = spec
    }

    public func encoded() -> [UInt8] {
        var b = Self.magic
        b.append(le: Self.version)
        b.append(le: UInt32(4096))
        b.append(le: memory)
        b.append(le: vcpus)
        b.append(backend)
        b.append(backing)
        b.append(le: UInt16(0))
        let spec = Array(self.spec.utf8)
        b.append(le: UInt32(spec.count))
        b.append(le: CRC32.checksum(b + spec))
        return b + spec
    }

    /// Reads and checks a header.
    public static func read(from c: Connection) throws -> StreamHeader {
        let h = try c.receive(40)
        guard Array(h[0..<8]) == magic else { throw MigrationError.badStream("not a migration stream (bad magic)") }
        guard h.le(UInt32.self, at: 8) == version else { throw MigrationError.badStream("stream version \(h.le(UInt32.self, at: 8)), this build reads \(version)") }
        guard h.le(UInt32.self, at: 12) == 4096 else { throw MigrationError.badStream("page size \(h.le(UInt32.self, at: 12)), expected 4096") }
        let specLength = Int(h.le(UInt32.self, at: 32))
        guard specLength <= 4096 else { throw MigrationError.badStream("workload spec of \(specLength) bytes") }
        let spec = try c.receive(specLength)
        guard CRC32.checksum(Array(h[0..<36]) + spec) == h.le(UInt32.self, at: 36) else { throw MigrationError.badStream("header checksum mismatch") }
        return StreamHeader(memory: h.le(UInt64.self, at: 16), vcpus: h.le(UInt32.self, at: 24), backend: h[28],
                            backing: h[29], spec: String(decoding: spec, as: UTF8.self))
    }
}

/// One record as read from the stream, checked.
public struct Record {
    public var type: RecordType
    public var zero: Bool
    public var count: UInt32
    public var firstPage: UInt64
    public var payload: [UInt8]

    public static let headerSize = 24
    public static let maxPagesPerRecord: UInt32 = 256

    /// Encodes a record header for `payload` (the CRC covers header and payload).
    static func header(_ type: RecordType, zero: Bool = false, count: UInt32 = 0, firstPage: UInt64 = 0,
                       payload: UnsafeRawBufferPointer) -> [UInt8] {
        var h: [UInt8] = [type.rawValue, zero ? 1 : 0, 0, 0]
        h.append(le: count)
        h.append(le: firstPage)
        h.append(le: UInt32(payload.count))
        var crc = CRC32()
        crc.update(h)
        crc.update(payload)
        h.append(le: crc.value)
        return h
    }

    /// Reads the next record, checking its CRC and sizes.
    static func read(from c: Connection, pageLimit: UInt64, into buffer: inout [UInt8]) throws -> Record {
        let h = try c.receive(headerSize)
        guard let type = RecordType(rawValue: h[0]) else { throw MigrationError.badStream("unknown record type \(h[0])") }
        let zero = h[1] & 1 != 0
        let count = h.le(UInt32.self, at: 4), first = h.le(UInt64.self, at: 8), length = Int(h.le(UInt32.self, at: 16))
        switch type {
        case .pages:
            guard count > 0, count <= maxPagesPerRecord, first + UInt64(count) <= pageLimit else {
                throw MigrationError.badStream("page run \(first)+\(count) outside guest memory of \(pageLimit) pages")
            }
            guard length == (zero ? 0 : Int(count) * 4096) else { throw MigrationError.badStream("page record of \(length) bytes for \(count) pages") }
        case .state: guard length <= 1 << 20 else { throw MigrationError.badStream("state record of \(length) bytes") }
        case .end: guard length == 32 else { throw MigrationError.badStream("end record of \(length) bytes") }
        }
        if buffer.count < length { buffer = [UInt8](repeating: 0, count: length) }
        try buffer.withUnsafeMutableBytes { b in try c.receive(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<length])) }
        var crc = CRC32()
        crc.update(Array(h[0..<20]))
        buffer.withUnsafeBytes { crc.update(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
        guard crc.value == h.le(UInt32.self, at: 20) else { throw MigrationError.badStream("checksum mismatch in a \(type) record at page \(first)") }
        return Record(type: type, zero: zero, count: count, firstPage: first, payload: type == .pages ? [] : Array(buffer[0..<length]))
    }
}

/// SHA-256 of all guest memory, page 0 first.
public func memoryDigest(_ memory: HostMemory) -> [UInt8] {
    var h = SHA256()
    h.update(bufferPointer: UnsafeRawBufferPointer(start: memory.pointer, count: Int(memory.size)))
    return Array(h.finalize())
}

/// CRC-32 (IEEE 802.3), table-driven.
public struct CRC32 {
    static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }
    private var crc: UInt32 = 0xFFFF_FFFF
    public init() {}
    public var value: UInt32 { crc ^ 0xFFFF_FFFF }
    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        var c = crc
        Self.table.withUnsafeBufferPointer { t in
            for b in bytes { c = t[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        }
        crc = c
    }
    public mutating func update(_ bytes: [UInt8]) { bytes.withUnsafeBytes { update($0) } }
    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var c = CRC32()
        c.update(bytes)
        return c.value
    }
}

extension Array where Element == UInt8 {
    mutating func append<T: FixedWidthInteger>(le v: T) {
        Swift.withUnsafeBytes(of: v.littleEndian) { append(contentsOf: $0) }
    }
    func le<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        var v: T = 0
        Swift.withUnsafeMutableBytes(of: &v) { $0.copyBytes(from: self[offset..<offset + MemoryLayout<T>.size]) }
        return T(littleEndian: v)
    }
}
