import Foundation
import GuestMemory
import VirtualMachine
import Workload

/// The stream's record types (docs/migration-stream.md).
public enum RecordType: UInt8, Sendable {
    case pages = 1
    case state = 2
    case end = 3
    /// Closes a pass on one channel: no record of the next pass is applied before every channel has
    /// closed this one.
    case sync = 4
}

/// What went wrong in a migration, on either side.
public enum MigrationError: Error, Equatable, CustomStringConvertible {
    case connection(String)
    case timeout(String)
    case badStream(String)
    case digestMismatch
    case refused
    case vm(String)
    case authentication(String)
    case cancelled

    public var description: String {
        switch self {
        case let .connection(why): return "connection: \(why)"
        case let .timeout(what): return "timed out: \(what)"
        case let .badStream(why): return "bad migration stream or snapshot: \(why)"
        case .digestMismatch: return "the destination's memory digest does not match the source's: the guest was not resumed there"
        case .refused: return "the destination refused the guest (see its output)"
        case let .vm(why): return "VM: \(why)"
        case let .authentication(why): return "authentication failed: \(why)"
        case .cancelled: return "cancelled"
        }
    }
}

extension BackendKind {
    /// A backend's code in stream and snapshot headers and state records: vCPU state only runs on a VM
    /// of the same kind.
    var wireCode: UInt8 { self == .soft ? 0 : 1 }
    init?(wireCode: UInt8) {
        switch wireCode {
        case 0: self = .soft
        case 1: self = .kvm
        default: return nil
        }
    }
}

extension Backing {
    /// A backing's code in headers: its index among the cases (an unknown code reads as 4k pages).
    var wireCode: UInt8 { UInt8(Backing.allCases.firstIndex(of: self) ?? 0) }
    init(wireCode: UInt8) {
        self = Backing.allCases.indices.contains(Int(wireCode)) ? Backing.allCases[Int(wireCode)] : .pages4K
    }
}

/// The guest a stream or snapshot header describes: what the receiving end builds.
public struct GuestDescription: Equatable, Sendable {
    public var layout: RAMLayout
    public var vcpus: UInt32
    public var backend: UInt8
    public var backing: UInt8
    /// The workload the guest runs, which the receiving end continues.
    public var spec: String

    public init(layout: RAMLayout, vcpus: UInt32, backend: UInt8, backing: UInt8, spec: String) {
        self.layout = layout
        self.vcpus = vcpus
        self.backend = backend
        self.backing = backing
        self.spec = spec
    }

    /// `vm` running `spec`.
    init(_ vm: any VirtualMachine, spec: WorkloadSpec) {
        self.init(layout: vm.ram.layout, vcpus: UInt32(vm.vcpuCount), backend: vm.backend.wireCode,
                  backing: vm.ram.backing.wireCode, spec: spec.description)
    }

    /// vCPUs (4), backend (1), backing (1), reserved (2), slot count (4), per slot its GPA (8) and
    /// size (8), the spec's length (4) and the spec (UTF-8).
    func encoded() -> [UInt8] {
        var b: [UInt8] = []
        b.append(le: vcpus)
        b.append(backend)
        b.append(backing)
        b.append(le: UInt16(0))
        b.append(le: UInt32(layout.regions.count))
        for r in layout.regions {
            b.append(le: r.gpa.raw)
            b.append(le: r.size)
        }
        let text = Array(spec.utf8)
        b.append(le: UInt32(text.count))
        return b + text
    }

    static func decode(_ b: [UInt8], context: String) throws -> GuestDescription {
        func need(_ n: Int) throws { guard b.count >= n else { throw MigrationError.badStream("\(context)header too short") } }
        try need(12)
        let slots = Int(b.le(UInt32.self, at: 8))
        guard slots <= RAMLayout.maxRegions else { throw MigrationError.badStream("\(context)\(slots) memory slots") }
        try need(16 + slots * 16)
        let regions = (0..<slots).map { i in RAMLayout.Region(gpa: GPA(b.le(UInt64.self, at: 12 + i * 16)), size: b.le(UInt64.self, at: 20 + i * 16)) }
        let layout: RAMLayout
        do { layout = try RAMLayout(regions) } catch { throw MigrationError.badStream("\(context)\(error)") }
        let specAt = 12 + slots * 16
        let specLength = Int(b.le(UInt32.self, at: specAt))
        guard b.count == specAt + 4 + specLength else { throw MigrationError.badStream("\(context)header length does not match its spec") }
        return GuestDescription(layout: layout, vcpus: b.le(UInt32.self, at: 0), backend: b[4], backing: b[5],
                                spec: String(decoding: b[(specAt + 4)...], as: UTF8.self))
    }

    /// Builds the VM this describes, after checking it (`context` starts each error).
    func makeGuest(context: String = "") throws -> (any VirtualMachine, WorkloadSpec) {
        guard layout.size <= 1 << 40, (1...64).contains(vcpus) else {
            throw MigrationError.badStream("\(context)guest of \(layout) and \(vcpus) vCPUs")
        }
        let spec: WorkloadSpec
        do { spec = try WorkloadSpec.parse(self.spec) } catch { throw MigrationError.badStream("\(context)workload spec: \(error)") }
        guard let kind = BackendKind(wireCode: backend) else { throw MigrationError.badStream("\(context)unknown backend code \(backend)") }
        let vm = try makeVirtualMachine(VMConfig(backend: kind, layout: layout, backing: Backing(wireCode: backing), vcpus: Int(vcpus)))
        return (vm, spec)
    }
}

extension Connection {
    /// The STATE record: the backend's code, then its encoding of the vCPUs.
    func sendState(_ state: VCPUStates) throws {
        try ([state.backend.wireCode] + state.bytes).withUnsafeBytes { p in try sendRecord(Record.header(.state, payload: p), p) }
    }

    /// The END record, carrying the memory digest.
    func sendEnd(digest: [UInt8]) throws {
        try digest.withUnsafeBytes { p in try sendRecord(Record.header(.end, payload: p), p) }
    }

    /// A SYNC record closing pass `pass` on this channel (`last`: the pass sent while paused).
    func sendSync(pass: UInt32, last: Bool) throws {
        let none = UnsafeRawBufferPointer(start: nil, count: 0)
        try sendRecord(Record.header(.sync, flags: last ? Record.lastPass : 0, count: pass, payload: none), none)
    }
}

extension VirtualMachine {
    /// A bitmap naming every page of RAM (a first pass, a full snapshot).
    var allPages: [UInt64] {
        let words = Int((pages + 63) / 64)
        var bitmap = [UInt64](repeating: ~0, count: words)
        if pages % 64 != 0 { bitmap[words - 1] = (1 << (pages % 64)) - 1 }
        return bitmap
    }
}

/// The stream header.
public struct StreamHeader: Equatable, Sendable {
    public static let magic = Array("VMMMIGR1".utf8)
    public static let version: UInt32 = 2
    public var guest: GuestDescription
    /// Connections carrying page records (the first is this one).
    public var channels: UInt32
    /// Names this migration in the hello of its other channels.
    public var token: UInt32

    public init(guest: GuestDescription, channels: UInt32 = 1, token: UInt32 = 0) {
        self.guest = guest
        self.channels = channels
        self.token = token
    }

    public func encoded() -> [UInt8] {
        var b = Self.magic
        b.append(le: Self.version)
        b.append(le: UInt32(4096))
        b.append(le: channels)
        b.append(le: token)
        return sealHeader(b, guest.encoded())
    }

    /// Reads and checks a header.
    public static func read(from c: Connection) throws -> StreamHeader {
        let (h, tail) = try readSealedHeader(from: c, fixedSize: 24, magic: magic, what: "migration stream")
        guard h.le(UInt32.self, at: 8) == version else { throw MigrationError.badStream("stream version \(h.le(UInt32.self, at: 8)), this build reads \(version)") }
        guard h.le(UInt32.self, at: 12) == 4096 else { throw MigrationError.badStream("page size \(h.le(UInt32.self, at: 12)), expected 4096") }
        let channels = h.le(UInt32.self, at: 16)
        guard (1...maxChannels).contains(channels) else { throw MigrationError.badStream("\(channels) channels") }
        return StreamHeader(guest: try GuestDescription.decode(tail, context: ""), channels: channels, token: h.le(UInt32.self, at: 20))
    }

    public static let maxChannels: UInt32 = 16
}

/// A header's fixed fields, then the length of what follows, a checksum of all of it, and what
/// follows (the guest description): the layout the stream and snapshot headers share.
func sealHeader(_ fixed: [UInt8], _ tail: [UInt8]) -> [UInt8] {
    var b = fixed
    b.append(le: UInt32(tail.count))
    b.append(le: RecordChecksum.checksum(b + tail))
    return b + tail
}

/// Reads a sealed header: checks the magic, the length and the checksum; returns the fixed fields
/// (plus the length and checksum words) and what follows them.
func readSealedHeader(from c: Connection, fixedSize: Int, magic: [UInt8], what: String) throws -> ([UInt8], [UInt8]) {
    let h = try c.receive(fixedSize + 8)
    guard Array(h[0..<magic.count]) == magic else { throw MigrationError.badStream("not a \(what) (bad magic)") }
    let length = Int(h.le(UInt32.self, at: fixedSize))
    guard length <= 8192 else { throw MigrationError.badStream("\(what) header of \(length) bytes") }
    let tail = try c.receive(length)
    guard RecordChecksum.checksum(Array(h[0..<fixedSize + 4]) + tail) == h.le(UInt32.self, at: fixedSize + 4) else {
        throw MigrationError.badStream("\(what) header checksum mismatch")
    }
    return (h, tail)
}

/// One record as read from the stream, checked.
public struct Record {
    public var type: RecordType
    public var zero: Bool
    /// SYNC: the pass sent while the source was paused.
    public var last: Bool
    public var count: UInt32
    public var firstPage: UInt64
    public var payload: [UInt8]

    public static let headerSize = 24
    public static let maxPagesPerRecord: UInt32 = 256
    /// Flag bits: PAGES all zero; SYNC closing the last pass.
    static let zeroRun: UInt8 = 1, lastPass: UInt8 = 2

    /// Encodes a record header for `payload` (the CRC covers header and payload).
    static func header(_ type: RecordType, zero: Bool = false, flags: UInt8 = 0, count: UInt32 = 0, firstPage: UInt64 = 0,
                       payload: UnsafeRawBufferPointer) -> [UInt8] {
        var h: [UInt8] = [type.rawValue, (zero ? zeroRun : 0) | flags, 0, 0]
        h.reserveCapacity(headerSize)
        h.append(le: count)
        h.append(le: firstPage)
        h.append(le: UInt32(payload.count))
        var crc = RecordChecksum()
        crc.update(h)
        crc.update(payload)
        h.append(le: crc.value)
        return h
    }

    /// Reads the next record, checking its CRC and sizes.
    static func read(from c: Connection, pageLimit: UInt64, into buffer: inout [UInt8]) throws -> Record {
        let h = try c.receive(headerSize)
        guard let type = RecordType(rawValue: h[0]) else { throw MigrationError.badStream("unknown record type \(h[0])") }
        let zero = type == .pages && h[1] & zeroRun != 0
        let count = h.le(UInt32.self, at: 4), first = h.le(UInt64.self, at: 8), length = Int(h.le(UInt32.self, at: 16))
        switch type {
        case .pages:
            guard count > 0, count <= maxPagesPerRecord, first + UInt64(count) <= pageLimit else {
                throw MigrationError.badStream("page run \(first)+\(count) outside guest memory of \(pageLimit) pages")
            }
            guard length == (zero ? 0 : Int(count) * 4096) else { throw MigrationError.badStream("page record of \(length) bytes for \(count) pages") }
        case .state: guard length <= 1 << 20 else { throw MigrationError.badStream("state record of \(length) bytes") }
        case .end: guard length == 32 else { throw MigrationError.badStream("end record of \(length) bytes") }
        case .sync: guard length == 0 else { throw MigrationError.badStream("sync record of \(length) bytes") }
        }
        if buffer.count < length { buffer = [UInt8](repeating: 0, count: length) }
        try buffer.withUnsafeMutableBytes { b in try c.receive(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<length])) }
        var crc = RecordChecksum()
        h.withUnsafeBytes { crc.update(UnsafeRawBufferPointer(rebasing: $0[0..<20])) }
        buffer.withUnsafeBytes { crc.update(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
        guard crc.value == h.le(UInt32.self, at: 20) else { throw MigrationError.badStream("checksum mismatch in a \(type) record at page \(first)") }
        if let mac = c.receiveMAC {
            let expected = buffer.withUnsafeBytes { mac.next(header: h, payload: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
            guard Handshake.constantTimeEqual(try c.receive(32), expected) else {
                throw MigrationError.authentication("a \(type) record's MAC does not match: the stream was altered")
            }
        }
        return Record(type: type, zero: zero, last: type == .sync && h[1] & lastPass != 0, count: count, firstPage: first,
                      payload: type == .pages ? [] : Array(buffer[0..<length]))
    }
}

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
        let h = Self.avalanche(lanes.0 ^ (lanes.1 &* 3) ^ (lanes.2 &* 5) ^ (lanes.3 &* 7) ^ length)
        return UInt32(truncatingIfNeeded: h) ^ UInt32(truncatingIfNeeded: h >> 32)
    }

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
