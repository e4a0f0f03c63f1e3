import Workload

/// The guest's state beyond its memory, as its backend saves it: what the vCPUs run and where each
/// one is (on kvm its registers), and any device state. The engines that carry it (migration,
/// snapshots) treat it as opaque bytes; the backend that wrote it reads it, knowing each `format`
/// it ever wrote. docs/migration-stream.md, "The guest's state", gives each backend's formats.
public struct MachineState: Sendable, Equatable {
    public var backend: BackendKind
    /// How the backend encoded `bytes`. A backend refuses a format newer than it knows, naming both.
    public var format: UInt16
    public var bytes: [UInt8]
    public init(backend: BackendKind, format: UInt16, bytes: [UInt8]) {
        self.backend = backend
        self.format = format
        self.bytes = bytes
    }

    /// Format 0, what version 2 and 3 streams and snapshots held: their header's workload spec (put
    /// here by the reader of those files), then the vCPU bytes of their STATE record.
    public static func legacy(backend: BackendKind, spec: String, vcpus: [UInt8]) -> MachineState {
        var w = StateWriter()
        w.string(spec)
        return MachineState(backend: backend, format: 0, bytes: w.bytes + vcpus)
    }
}

/// Writes a state's fields: little-endian integers, length-prefixed strings.
struct StateWriter {
    var bytes: [UInt8] = []
    mutating func int<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func string(_ s: String) {
        int(UInt32(s.utf8.count))
        bytes += s.utf8
    }
    /// Fixed-size raw bytes (a C array of bytes, as KVM's FPU registers).
    mutating func raw<T>(_ v: T) { withUnsafeBytes(of: v) { bytes += $0 } }
}

/// Reads what a StateWriter wrote; running past the end, or bytes left over, is an error that names
/// the backend's state.
struct StateReader {
    private let bytes: [UInt8]
    private var at = 0
    private let what: String
    init(_ state: MachineState, skipping: Int = 0) {
        bytes = state.bytes
        at = skipping
        what = "the \(state.backend) backend's state (format \(state.format))"
    }

    var remaining: [UInt8] { Array(bytes[min(at, bytes.count)...]) }

    private mutating func take(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, bytes.count - at >= n else { throw VMError.failed("\(what) ends early: it is damaged or was cut short") }
        defer { at += n }
        return bytes[at..<at + n]
    }
    mutating func int<T: FixedWidthInteger>(_: T.Type = T.self) throws -> T {
        var v: T = 0
        let b = try take(MemoryLayout<T>.size)
        withUnsafeMutableBytes(of: &v) { $0.copyBytes(from: b) }
        return T(littleEndian: v)
    }
    mutating func string() throws -> String {
        let n = Int(try int(UInt32.self))
        return String(decoding: try take(n), as: UTF8.self)
    }
    mutating func raw<T>(into v: inout T) throws {
        let b = try take(MemoryLayout<T>.size)
        withUnsafeMutableBytes(of: &v) { $0.copyBytes(from: b) }
    }
    /// The workload a state begins with.
    mutating func workload() throws -> WorkloadSpec {
        let text = try string()
        do { return try WorkloadSpec.parse(text) } catch { throw VMError.failed("\(what) names a workload that does not parse (\(text))", cause: error) }
    }
    /// Checks a vCPU count against the VM's.
    mutating func vcpus(_ expected: Int) throws {
        let n = Int(try int(UInt32.self))
        guard n == expected else { throw VMError.failed("\(what) holds \(n) vCPUs; this VM has \(expected)") }
    }
    func finish() throws {
        guard at == bytes.count else { throw VMError.failed("\(what) has \(bytes.count - at) bytes more than it should: it is damaged") }
    }

    /// Refuses a format newer than `newest`, or of another backend.
    static func check(_ state: MachineState, is backend: BackendKind, newest: UInt16) throws {
        guard state.backend == backend else {
            throw VMError.unsupported("state saved by a \(state.backend) VM cannot run on the \(backend) backend")
        }
        guard state.format <= newest else {
            throw VMError.unsupported("the \(backend) backend's state is in format \(state.format); this build reads formats 0 to \(newest): update it")
        }
    }
}
