import Foundation
import Glibc
import HostSystem

/// A client of the control socket (`vmm ctl`, the tests, a script's library): connects, reads the
/// greeting, negotiates, then sends commands and reads their answers; events that arrive meanwhile
/// are kept for `waitEvent`. Every read has a deadline.
public final class ControlClient {
    private let socket: FileDescriptor
    private var fd: Int32 { socket.raw }
    private var buffer: [UInt8] = []
    public let timeout: Double
    /// Events read so far and not yet waited for, oldest first.
    public private(set) var events: [JSON] = []
    /// The greeting the server sent.
    public private(set) var greeting: JSON = .null

    /// Connects to `path`; with `negotiate`, also sends `qmp_capabilities`.
    public init(path: String, timeout: Double = 30, negotiate: Bool = true) throws {
        self.timeout = timeout
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw QMPError.generic("socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        do {
            socket = FileDescriptor(owning: try system("socket") { Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) })
        } catch { throw QMPError.generic("\(error)") }
        let fd = socket.raw
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard rc == 0 else {
            let e = errno
            throw QMPError.generic("cannot connect to \(path): \(String(cString: strerror(e))) (is `vmm start --api \(path)` running?)")
        }
        greeting = try readMessage()
        guard greeting["QMP"] != nil else { throw QMPError.generic("\(path) did not greet as a QMP server: \(greeting)") }
        if negotiate {
            if case let .failure(e) = try execute("qmp_capabilities") { throw e }
        }
    }

    /// Sends raw bytes (a test's malformed input).
    public func send(raw bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw QMPError.generic("send: \(String(cString: strerror(errno)))") }
            off += n
        }
    }

    /// Runs a command: its `return`, or its error.
    public func execute(_ command: String, _ arguments: JSON = .object([])) throws -> Result<JSON, QMPError> {
        var request: [(String, JSON)] = [("execute", .string(command))]
        if case let .object(a) = arguments, !a.isEmpty { request.append(("arguments", arguments)) }
        try send(raw: JSON.object(request).utf8 + [0x0A])
        return try readAnswer()
    }

    /// The next answer (skipping events, which are kept).
    public func readAnswer() throws -> Result<JSON, QMPError> {
        while true {
            let m = try readMessage()
            if m["event"] != nil { events.append(m); continue }
            if let r = m["return"] { return .success(r) }
            if let e = m["error"] { return .failure(QMPError(e["class"]?.string ?? "GenericError", e["desc"]?.string ?? "\(e)")) }
            throw QMPError.generic("an answer that is neither return nor error: \(m)")
        }
    }

    /// Waits for event `name` (one already read counts); returns it and forgets it and those before.
    public func waitEvent(_ name: String, timeout: Double? = nil) throws -> JSON {
        let deadline = Date().addingTimeInterval(timeout ?? self.timeout)
        while true {
            if let i = events.firstIndex(where: { $0["event"]?.string == name }) {
                let e = events[i]
                events.removeFirst(i + 1)
                return e
            }
            let m = try readMessage(until: deadline)
            if m["event"] != nil { events.append(m) }
        }
    }

    /// One JSON line from the server.
    public func readMessage(until deadline: Date? = nil) throws -> JSON {
        let deadline = deadline ?? Date().addingTimeInterval(timeout)
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                return try JSON.parse(line)
            }
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else { throw QMPError.generic("no answer within \(timeout) s") }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let rc = poll(&p, 1, Int32(min(left, 1) * 1000) + 1)
            if rc < 0 && errno == EINTR { continue }
            guard rc > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 64 << 10)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw QMPError.generic("the VM closed the control connection") }
            buffer += chunk[..<n]
        }
    }
}
