import Foundation
import Glibc
import GuestMemory
import VirtualMachine

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

/// The guest a stream or snapshot header describes: what the receiving end builds before any page
/// arrives. What the guest runs travels in its state (STATE), which only its backend reads.
public struct GuestDescription: Equatable, Sendable {
    public var layout: RAMLayout
    public var vcpus: UInt32
    public var backend: UInt8
    public var backing: UInt8
    /// The workload spec that streams and snapshots before version 4 carried here; their STATE
    /// record's bytes follow it in a format 0 state.
    var legacySpec: String?

    public init(layout: RAMLayout, vcpus: UInt32, backend: UInt8, backing: UInt8) {
        self.layout = layout
        self.vcpus = vcpus
        self.backend = backend
        self.backing = backing
    }

    init(_ vm: any VirtualMachine) {
        self.init(layout: vm.ram.layout, vcpus: UInt32(vm.vcpuCount), backend: vm.backend.wireCode, backing: vm.ram.backing.wireCode)
    }

    /// vCPUs (4), backend (1), backing (1), reserved (2), slot count (4), per slot its GPA (8) and
    /// size (8). Before version 4: then the spec's length (4) and the spec (UTF-8).
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
        return b
    }

    /// Reads a description of stream or snapshot `version`.
    static func decode(_ b: [UInt8], version: UInt32, context: String) throws -> GuestDescription {
        func need(_ n: Int) throws { guard b.count >= n else { throw MigrationError.badStream("\(context)header too short") } }
        try need(12)
        let slots = Int(b.le(UInt32.self, at: 8))
        guard slots <= RAMLayout.maxRegions else { throw MigrationError.badStream("\(context)\(slots) memory slots") }
        let end = 12 + slots * 16
        try need(end)
        let regions = (0..<slots).map { i in RAMLayout.Region(gpa: GPA(b.le(UInt64.self, at: 12 + i * 16)), size: b.le(UInt64.self, at: 20 + i * 16)) }
        let layout: RAMLayout
        do { layout = try RAMLayout(regions) } catch { throw MigrationError.badStream("\(context)the guest's memory layout", cause: error) }
        var guest = GuestDescription(layout: layout, vcpus: b.le(UInt32.self, at: 0), backend: b[4], backing: b[5])
        if version < 4 {
            try need(end + 4)
            guard b.count == end + 4 + Int(b.le(UInt32.self, at: end)) else { throw MigrationError.badStream("\(context)header length does not match its spec") }
            guest.legacySpec = String(decoding: b[(end + 4)...], as: UTF8.self)
        } else {
            guard b.count == end else { throw MigrationError.badStream("\(context)header length does not match its memory slots") }
        }
        return guest
    }

    /// The machine state a STATE record carries: in version 4, the backend's code (1), a reserved
    /// byte, the state's format (2) and its bytes; before, the backend's code and the vCPU bytes,
    /// with the workload in the header.
    func state(from payload: [UInt8], context: String = "") throws -> MachineState {
        guard let kind = BackendKind(wireCode: backend), payload.first == backend else {
            throw MigrationError.badStream("\(context)state of another backend than the header's")
        }
        if let legacySpec { return .legacy(backend: kind, spec: legacySpec, vcpus: Array(payload.dropFirst())) }
        guard payload.count >= 4, payload[1] == 0 else { throw MigrationError.badStream("\(context)a malformed state record") }
        return MachineState(backend: kind, format: payload.le(UInt16.self, at: 2), bytes: Array(payload[4...]))
    }

    /// Builds the VM this describes, after checking it (`context` starts each error): a guest larger
    /// than `maxMemory`, or one the host cannot map, is refused as out of memory.
    func makeGuest(context: String = "", maxMemory: UInt64? = nil) throws -> any VirtualMachine {
        guard layout.size <= 1 << 40, (1...64).contains(vcpus) else {
            throw MigrationError.badStream("\(context)guest of \(layout) and \(vcpus) vCPUs")
        }
        if let maxMemory, layout.size > maxMemory {
            throw MigrationError(.outOfMemory, "the guest has \(formatBytes(layout.size)) of memory; the destination takes at most "
                                 + "\(formatBytes(maxMemory)) (its --max-memory)")
        }
        guard let kind = BackendKind(wireCode: backend) else { throw MigrationError.badStream("\(context)unknown backend code \(backend)") }
        do {
            return try makeVirtualMachine(VMConfig(backend: kind, layout: layout, backing: Backing(wireCode: backing), vcpus: Int(vcpus)))
        } catch let e as GuestMemoryError {
            switch e {
            case .systemCall(_, errno: ENOMEM), .hugePagesNotReserved:
                throw MigrationError(.outOfMemory, "the destination cannot map the guest's \(formatBytes(layout.size))", cause: e)
            default:
                throw MigrationError.vm("\(context)making the guest", cause: e)
            }
        } catch {
            throw MigrationError.vm("\(context)making the guest", cause: error)
        }
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

/// A version 2 stream's header (this build still reads version 2 streams, without a key): the
/// magic and version (already read when the stream was told apart from a version 3 OPEN), the page
/// size, the channels, the token, then the sealed guest description.
struct Version2Header {
    var guest: GuestDescription

    /// Reads the rest of a header whose first 12 bytes were `prefix`.
    static func read(from c: Connection, prefix: [UInt8]) throws -> Version2Header {
        let (h, tail) = try readSealedHeader(from: c, fixedSize: 24, magic: Handshake.magic, what: "migration stream", prefix: prefix)
        guard h.le(UInt32.self, at: 12) == 4096 else { throw MigrationError.badStream("page size \(h.le(UInt32.self, at: 12)), expected 4096") }
        let channels = h.le(UInt32.self, at: 16)
        guard channels == 1 else {
            throw MigrationError(.version, "a version 2 source sends over \(channels) channels; this destination takes version 2 streams "
                                 + "on one channel only: update the source, or use one channel")
        }
        return Version2Header(guest: try GuestDescription.decode(tail, version: 2, context: ""))
    }
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
func readSealedHeader(from c: Connection, fixedSize: Int, magic: [UInt8], what: String, prefix: [UInt8] = []) throws -> ([UInt8], [UInt8]) {
    let h = prefix + (try c.receive(fixedSize + 8 - prefix.count))
    guard Array(h[0..<magic.count]) == magic else { throw MigrationError.badStream("not a \(what) (bad magic)") }
    let length = Int(h.le(UInt32.self, at: fixedSize))
    guard length <= 8192 else { throw MigrationError.badStream("\(what) header of \(length) bytes") }
    let tail = try c.receive(length)
    guard RecordChecksum.checksum(Array(h[0..<fixedSize + 4]) + tail) == h.le(UInt32.self, at: fixedSize + 4) else {
        throw MigrationError.badStream("\(what) header checksum mismatch")
    }
    return (h, tail)
}

