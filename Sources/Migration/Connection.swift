import Foundation
import Glibc
import Synchronization

/// HOST:PORT, parsed. HOST is an IPv4 address or "localhost".
public struct Endpoint: Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) { self.host = host; self.port = port }

    public init?(_ text: String) {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else { return nil }
        let host = String(text[..<colon])
        self.host = host.isEmpty ? "127.0.0.1" : host
        self.port = port
    }

    public var description: String { "\(host):\(port)" }

    func sockaddr() throws -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        let h = host == "localhost" ? "127.0.0.1" : host
        guard inet_pton(AF_INET, h, &a.sin_addr) == 1 else { throw MigrationError.connection("\(host) is not an IPv4 address") }
        return a
    }
}

/// One end of a stream: a TCP connection whose every send and receive has a timeout (so nothing
/// waits forever), or a snapshot file.
public final class Connection: @unchecked Sendable {
    let fd: Int32
    /// A regular file (a snapshot) rather than a socket.
    let isFile: Bool
    public private(set) var bytesSent: UInt64 = 0
    public private(set) var bytesReceived: UInt64 = 0
    /// Bytes per second this connection may send (nil: unlimited); sends sleep to stay under it.
    public var maxBandwidth: Double?
    private var paceStart = Date()
    private var pacedBytes: Double = 0

    private let cancelled = Atomic<Bool>(false)
    /// Set by `cancel()`.
    public var isCancelled: Bool { cancelled.load(ordering: .acquiring) }

    /// Cancels the transfer from any thread (Ctrl-C): the connection is shut down, a send or receive
    /// blocked on it returns, and the side using it fails with `.cancelled` and rolls back.
    public func cancel() {
        cancelled.store(true, ordering: .releasing)
        if !isFile { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// Shuts the connection down from any thread, so a send or receive blocked on it returns (a
    /// failure on another channel of the same migration), without marking it cancelled.
    func abort() {
        if !isFile { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// A failure as the caller should see it: after `cancel()` every failure is the cancellation.
    func failure(_ e: MigrationError) -> MigrationError { isCancelled ? .cancelled : e }

    /// Set once a key handshake succeeded: every record then carries a MAC.
    var sendMAC: RecordMAC?
    var receiveMAC: RecordMAC?

    /// Sends one record: its header, its payload and, on an authenticated connection, its MAC.
    func sendRecord(_ header: [UInt8], _ payload: UnsafeRawBufferPointer) throws {
        try send(header)
        if payload.count > 0 { try send(payload) }
        if let mac = sendMAC { try send(mac.next(header: header, payload: payload)) }
    }

    /// Runs the key handshake as the source (`asSource`) or destination; afterwards records are MAC'd.
    public func authenticate(with key: MigrationKey, asSource: Bool) throws {
        let session = asSource ? try Handshake.source(self, key: key) : try Handshake.destination(self, key: key)
        // The source's records are direction 1, the destination's 2: never the same nonce twice.
        sendMAC = RecordMAC(key: session, direction: asSource ? 1 : 2)
        receiveMAC = RecordMAC(key: session, direction: asSource ? 2 : 1)
    }

    /// Opens a snapshot file for writing (created, truncated) or reading.
    public init(file path: String, writing: Bool) throws {
        let fd = writing ? open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) : open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw MigrationError.connection("open \(path): \(String(cString: strerror(errno)))") }
        self.fd = fd
        isFile = true
    }

    /// Makes what was written durable (a snapshot is complete only after this).
    public func sync() throws {
        try flush()
        guard fsync(fd) == 0 else { throw MigrationError.connection("fsync: \(String(cString: strerror(errno)))") }
    }

    init(fd: Int32, timeout: Double) {
        self.fd = fd
        isFile = false
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var big: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit {
        try? flush()
        close(fd)
        output.deallocate()
        input.deallocate()
    }

    /// Connects to `endpoint`, giving up after `timeout` seconds.
    /// The `channels` connections of one migration: the main one and the others.
    public static func connect(to endpoint: Endpoint, channels: Int, timeout: Double = 10) throws -> (Connection, [Connection]) {
        guard (1...Int(StreamHeader.maxChannels)).contains(channels) else {
            throw MigrationError.connection("\(channels) channels: give 1 to \(StreamHeader.maxChannels)")
        }
        let main = try connect(to: endpoint, timeout: timeout)
        return (main, try (1..<channels).map { _ in try connect(to: endpoint, timeout: timeout) })
    }

    public static func connect(to endpoint: Endpoint, timeout: Double = 10) throws -> Connection {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MigrationError.connection("socket: \(String(cString: strerror(errno)))") }
        var a = try endpoint.sockaddr()
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            if rc == 0 { return Connection(fd: fd, timeout: timeout) }
            let e = errno
            // Nobody listening yet: the destination may still be starting.
            if (e == ECONNREFUSED || e == EINTR) && Date() < deadline { usleep(20_000); continue }
            close(fd)
            throw MigrationError.connection("connect to \(endpoint): \(String(cString: strerror(e)))")
        }
    }

    /// Small writes are gathered here and go out in one system call (a pass over scattered dirty pages
    /// is many small records); reads are served from `input` the same way.
    private static let bufferSize = 256 << 10
    private let output = UnsafeMutableRawPointer.allocate(byteCount: Connection.bufferSize, alignment: 64)
    private var outputCount = 0
    private let input = UnsafeMutableRawPointer.allocate(byteCount: Connection.bufferSize, alignment: 64)
    private var inputStart = 0, inputEnd = 0

    public func send(_ bytes: UnsafeRawBufferPointer) throws {
        if outputCount + bytes.count > Self.bufferSize { try flush() }
        if bytes.count >= Self.bufferSize {
            try write(bytes)
        } else if bytes.count > 0 {
            (output + outputCount).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            outputCount += bytes.count
        }
        bytesSent += UInt64(bytes.count)
        if let limit = maxBandwidth, limit > 0 {
            // Stay under the limit on average: sleep until the bytes sent so far are due.
            pacedBytes += Double(bytes.count)
            let due = pacedBytes / limit - Date().timeIntervalSince(paceStart)
            if due > 0.001 { try flush(); usleep(UInt32(min(due, 1) * 1e6)) }
        }
    }

    public func send(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { b in try send(b) }
    }

    /// Sends what `send` gathered. Receiving flushes first (the peer may be waiting for it), and so
    /// does `sync`; a last message with no answer to wait for must be flushed by its sender.
    public func flush() throws {
        guard outputCount > 0 else { return }
        let n = outputCount
        outputCount = 0
        try write(UnsafeRawBufferPointer(start: output, count: n))
    }

    private func write(_ bytes: UnsafeRawBufferPointer) throws {
        var off = 0
        while off < bytes.count {
            let n = isFile ? Glibc.write(fd, bytes.baseAddress! + off, bytes.count - off)
                           : Glibc.send(fd, bytes.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL))
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { throw failure(.timeout("sending to the peer")) }
                throw failure(.connection("send: \(String(cString: strerror(e)))"))
            }
            off += n
        }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        try flush()
        var off = 0
        while off < buffer.count {
            if inputStart < inputEnd {
                let n = min(inputEnd - inputStart, buffer.count - off)
                (buffer.baseAddress! + off).copyMemory(from: input + inputStart, byteCount: n)
                inputStart += n
                off += n
                continue
            }
            // Large reads go straight to the caller; small ones refill the buffer.
            let direct = buffer.count - off >= Self.bufferSize
            let (to, room) = direct ? (buffer.baseAddress! + off, buffer.count - off) : (input, Self.bufferSize)
            let n = isFile ? read(fd, to, room) : recv(fd, to, room, 0)
            if n == 0 {
                throw failure(isFile ? .badStream("the file ends early, after \(bytesReceived + UInt64(off)) bytes (truncated)")
                                     : .connection("the peer closed the connection after \(bytesReceived + UInt64(off)) bytes"))
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { throw failure(.timeout("waiting for the peer")) }
                throw failure(.connection("receive: \(String(cString: strerror(e)))"))
            }
            if direct { off += n } else { inputStart = 0; inputEnd = n }
        }
        bytesReceived += UInt64(buffer.count)
    }

    public func receive(_ count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        try b.withUnsafeMutableBytes { p in try receive(into: p) }
        return b
    }
}

/// A listening TCP socket.
public final class Listener: @unchecked Sendable {
    let fd: Int32
    public let endpoint: Endpoint

    /// Listens on `endpoint` (port 0 picks a free one; `endpoint` then names it).
    public init(_ endpoint: Endpoint) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MigrationError.connection("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var a = try endpoint.sockaddr()
        let rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0, listen(fd, 16) == 0 else {
            let e = errno
            close(fd)
            throw MigrationError.connection("listen on \(endpoint): \(String(cString: strerror(e)))")
        }
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        self.fd = fd
        self.endpoint = Endpoint(host: endpoint.host, port: UInt16(bigEndian: bound.sin_port))
    }

    deinit { close(fd) }

    /// Accepts one connection within `timeout` seconds.
    public func accept(timeout: Double) throws -> Connection {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let rc = poll(&p, 1, Int32(timeout * 1000))
        guard rc > 0 else { throw rc == 0 ? MigrationError.timeout("no source connected to \(endpoint) within \(timeout) s") : MigrationError.connection("poll: \(String(cString: strerror(errno)))") }
        let c = Glibc.accept(fd, nil, nil)
        guard c >= 0 else { throw MigrationError.connection("accept: \(String(cString: strerror(errno)))") }
        return Connection(fd: c, timeout: timeout)
    }
}
