import CVMMSys
import Foundation
import Glibc
import HostSystem
import Synchronization

/// One end of a stream: a socket (TCP or Unix) or a snapshot file. On a socket every send and
/// receive finishes within `timeout` seconds of its start or fails, however the peer trickles its
/// bytes; `cancel()` and `interrupt()` stop one from any thread within a tenth of a second, without
/// closing the socket, so the side can still tell its peer why.
public final class Connection: @unchecked Sendable {   // one reader and one writer at a time, by the protocol; cancel is atomic
    /// The socket or file, owned: closed when the connection goes.
    private let descriptor: FileDescriptor
    var fd: Int32 { descriptor.raw }

    /// Of a file: reads `count` bytes from byte `offset` (not moving the stream's place), or fewer
    /// where the file ends.
    func bytes(_ count: Int, at offset: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        let n: Int
        do { n = try b.withUnsafeMutableBytes { p throws(SystemCallError) in try descriptor.read(into: p, at: offset) } } catch {
            throw MigrationError.connection("reading a snapshot", cause: error)
        }
        b.removeLast(count - n)
        return b
    }
    /// A regular file (a snapshot) rather than a socket.
    let isFile: Bool
    /// Seconds a send or receive may take.
    public var timeout: Double
    public private(set) var bytesSent: UInt64 = 0
    public private(set) var bytesReceived: UInt64 = 0
    /// Bytes per second this connection may send (nil: unlimited); sends sleep to stay under it.
    public var maxBandwidth: Double? {
        didSet { paceStart = Date(); pacedBytes = 0 }
    }
    private var paceStart = Date()
    private var pacedBytes: Double = 0

    /// 0 running, 1 interrupted (another channel failed), 2 cancelled.
    private let stopped = Atomic<Int>(0)
    /// Set by `cancel()`.
    public var isCancelled: Bool { stopped.load(ordering: .acquiring) == 2 }
    /// The record sealing of each direction once a key handshake is done (nil: records in clear).
    var sendCipher: RecordCipher?
    var receiveCipher: RecordCipher?
    /// Where a sealed payload lands before it is opened.
    var openBuffer: [UInt8] = []
    private var ignoringStop = false
    /// One thread sends while another receives (post-copy's requests and pages): receiving then
    /// leaves flushing to the sender, whose buffer it would otherwise race for.
    var duplex = false

    /// Cancels the transfer from any thread (Ctrl-C): a send or receive under way fails with
    /// `.cancelled` within a tenth of a second, and the side using it rolls back and tells its peer.
    public func cancel() { stopped.store(2, ordering: .releasing) }

    /// Stops a send or receive under way from any thread (a failure on another channel of the same
    /// migration), without marking it cancelled.
    func interrupt() { _ = stopped.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing) }

    /// A failure as the caller should see it: after `cancel()` every failure is the cancellation.
    func failure(_ e: MigrationError) -> MigrationError { isCancelled ? .cancelled : e }

    /// Set while `sendRecord` writes one record: a stop then waits for the record's end (bounded by
    /// the timeout), so the peer never sees half a record before the ERROR that explains the stop.
    var sendingRecord = false

    func checkStopped(sending: Bool = false) throws {
        if ignoringStop || (sending && sendingRecord) { return }
        switch stopped.load(ordering: .acquiring) {
        case 0: return
        case 2: throw MigrationError.cancelled
        default: throw MigrationError.connection("stopped: another channel of this migration failed")
        }
    }

    /// Runs `body` as if not cancelled or interrupted, with a timeout of at most `timeout` (2 s: the
    /// last words to the peer of a side that stops).
    func withoutStop<T>(timeout cap: Double = 2, _ body: () throws -> T) throws -> T {
        let saved = timeout
        ignoringStop = true
        timeout = min(timeout, cap)
        defer { ignoringStop = false; timeout = saved }
        return try body()
    }

    /// Opens a snapshot file for writing (created, truncated) or reading. Only a regular file: a FIFO
    /// or a device found at the path would block the open or the writes (the VM manager's commands
    /// wait on them), so it is opened without blocking and checked before use.
    public init(file path: String, writing: Bool) throws {
        do {
            descriptor = try FileDescriptor(opening: path, (writing ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY) | O_NONBLOCK | O_NOCTTY, mode: 0o644)
        } catch {
            // ENXIO: a FIFO nobody reads, or a device with nothing behind it.
            throw error.errno == ENXIO ? Self.notAFile(path) : MigrationError.connection("cannot open \(path)", cause: error)
        }
        var st = stat()
        guard fstat(descriptor.raw, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { throw Self.notAFile(path) }
        _ = fcntl(descriptor.raw, F_SETFL, fcntl(descriptor.raw, F_GETFL) & ~O_NONBLOCK)
        isFile = true
        timeout = .infinity
    }

    private static func notAFile(_ path: String) -> MigrationError {
        .connection("\(path) is not a regular file: snapshots are written to and read from files")
    }

    /// Makes what was written durable (a snapshot is complete only after this).
    public func sync() throws {
        try flush()
        guard fsync(fd) == 0 else { throw MigrationError.connection("fsync: \(String(cString: strerror(errno)))") }
    }

    /// Takes a connected socket.
    init(socket: consuming FileDescriptor, timeout: Double) {
        let fd = socket.raw
        descriptor = socket
        isFile = false
        self.timeout = timeout
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))   // fails harmlessly on Unix sockets
        var big: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Two connected ends of a Unix socket pair (tests, and a migration within one process).
    public static func pair(timeout: Double = 10) throws -> (Connection, Connection) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw MigrationError.connection("socketpair: \(String(cString: strerror(errno)))")
        }
        return (Connection(socket: FileDescriptor(owning: fds[0]), timeout: timeout), Connection(socket: FileDescriptor(owning: fds[1]), timeout: timeout))
    }

    deinit {
        outputBuffer?.deallocate()
        inputBuffer?.deallocate()
    }

    /// The `channels` connections of one migration to `address`: the main one and the others.
    public static func connect(to address: MigrationAddress, channels: Int, timeout: Double = 10,
                               cancellation: Cancellation? = nil) throws -> (Connection, [Connection]) {
        guard (1...Int(maxChannels)).contains(channels) else {
            throw MigrationError.connection("\(channels) connections: give 1 to \(maxChannels) (post-copy takes one of them for the pages the destination asks for)")
        }
        let main = try connect(to: address, timeout: timeout, cancellation: cancellation)
        return (main, try (1..<channels).map { _ in try connect(to: address, timeout: timeout, cancellation: cancellation) })
    }

    /// Connects to `address` (each address it resolves to in turn), retrying while nobody listens
    /// yet, for up to `timeout` seconds, or until `cancellation` is cancelled.
    public static func connect(to address: MigrationAddress, timeout: Double = 10, cancellation: Cancellation? = nil) throws -> Connection {
        let targets = try address.resolve(passive: false)
        let deadline = Date().addingTimeInterval(timeout)
        var last = "no address"
        while true {
            for t in targets {
                if cancellation?.isCancelled == true { throw MigrationError.cancelled }
                let raw = socket(t.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard raw >= 0 else { last = "socket: \(String(cString: strerror(errno)))"; continue }
                let owned = FileDescriptor(owning: raw)   // closed unless a connection takes it
                let fd = raw
                // Non-blocking, so an unreachable host costs the timeout, not the kernel's minutes.
                let flags = fcntl(fd, F_GETFL)
                _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
                var e: Int32 = t.withSockaddr({ Glibc.connect(fd, $0, $1) }) == 0 ? 0 : errno
                if e == EINPROGRESS {
                    // In slices, so a cancel is seen while an unreachable host keeps us waiting.
                    var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                    e = ETIMEDOUT
                    while true {
                        if cancellation?.isCancelled == true { throw MigrationError.cancelled }
                        let left = deadline.timeIntervalSinceNow
                        let rc = poll(&p, 1, Int32(min(max(0, left), 0.1) * 1000) + 1)
                        if rc > 0 {
                            var len = socklen_t(MemoryLayout<Int32>.size)
                            getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len)
                            break
                        }
                        if left <= 0 { break }
                    }
                }
                if e == 0 {
                    _ = fcntl(fd, F_SETFL, flags)
                    return Connection(socket: owned, timeout: timeout)
                }
                last = String(cString: strerror(e))
                // Nobody listening yet: the destination may still be starting.
                guard e == ECONNREFUSED || e == ENOENT || e == EINTR || e == EAGAIN else { throw MigrationError.connection("connect to \(address): \(last)") }
            }
            guard Date() < deadline else { throw MigrationError.connection("connect to \(address): \(last) (for \(timeout) s)") }
            usleep(20_000)
        }
    }

    /// Small writes are gathered here and go out in one system call (a pass over scattered dirty pages
    /// is many small records); reads are served from `input` the same way. Each is made on first use:
    /// a snapshot file, read or written, needs only one.
    private static let bufferSize = 256 << 10
    private var outputBuffer: UnsafeMutableRawPointer?, inputBuffer: UnsafeMutableRawPointer?
    private var output: UnsafeMutableRawPointer { outputBuffer ?? Self.makeBuffer(&outputBuffer) }
    private var input: UnsafeMutableRawPointer { inputBuffer ?? Self.makeBuffer(&inputBuffer) }
    private var outputCount = 0
    private var inputStart = 0, inputEnd = 0

    private static func makeBuffer(_ buffer: inout UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer {
        let made = UnsafeMutableRawPointer.allocate(byteCount: bufferSize, alignment: 64)
        buffer = made
        return made
    }

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
            // Stay under the limit on average: sleep until the bytes sent so far are due, all of it
            // now (a debt left would fall on whatever is sent next: the pause's records). A
            // connection idle for long earns no burst: the schedule starts again.
            if pacedBytes / limit - Date().timeIntervalSince(paceStart) < -0.1 { paceStart = Date(); pacedBytes = 0 }
            pacedBytes += Double(bytes.count)
            var due = pacedBytes / limit - Date().timeIntervalSince(paceStart)
            if due > 0.001 { try flush() }
            while due > 0.001 {
                try checkStopped(sending: true)
                usleep(UInt32(min(due, 0.1) * 1e6))
                due = pacedBytes / limit - Date().timeIntervalSince(paceStart)
            }
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

    /// Flushes, then waits until the peer has acknowledged every byte (the socket's send queue is
    /// empty), within the timeout: so a pass's time, and the bandwidth drawn from it, are the
    /// link's and not how fast the socket buffers filled (on a slow link they hold seconds of it,
    /// which the pause would otherwise wait out). Files return at once. A peer that speaks (an ERROR)
    /// ends the wait, for the caller to read why; one that resets or hangs up fails it.
    func waitUntilDelivered() throws {
        try flush()
        let deadline = Date().addingTimeInterval(timeout)
        while cvmm_unsent_bytes(fd) > 0 {
            try checkStopped(sending: true)
            guard Date() < deadline else { throw failure(.timeout("the peer acknowledging what was sent within \(formatDuration(timeout))")) }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let rc = poll(&p, 1, 1)
            if rc > 0 {
                if p.revents & Int16(POLLERR | POLLHUP) != 0 { throw failure(.connection("the peer reset or closed the connection")) }
                return
            }
            if rc < 0 && errno != EINTR { throw failure(.connection("poll: \(String(cString: strerror(errno)))")) }
        }
    }

    /// Waits until the socket is ready for `events`, in slices so a cancel is seen, until `deadline`.
    /// `what` is built only for the timeout's message: a receiver that catches up with its sender
    /// waits here once per read, and building it each time cost thousands of allocations a migration.
    private func wait(_ events: Int16, until deadline: Date, doing what: @autoclosure () -> String) throws {
        while true {
            try checkStopped(sending: events == Int16(POLLOUT))
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else { throw failure(.timeout("\(what()) within \(formatDuration(timeout))")) }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let rc = poll(&p, 1, Int32(min(left, 0.1) * 1000) + 1)
            if rc > 0 { return }
            if rc < 0 && errno != EINTR { throw failure(.connection("poll: \(String(cString: strerror(errno)))")) }
        }
    }

    private func write(_ bytes: UnsafeRawBufferPointer) throws {
        var off = 0
        let deadline = Date().addingTimeInterval(timeout)
        while off < bytes.count {
            let n = isFile ? Glibc.write(fd, bytes.baseAddress! + off, bytes.count - off)
                           : Glibc.send(fd, bytes.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK {
                    try wait(Int16(POLLOUT), until: deadline, doing: "sending \(bytes.count) bytes to the peer")
                    continue
                }
                throw failure(.connection("send: \(String(cString: strerror(e)))"))
            }
            off += n
        }
    }

    /// Fills `buffer`, waiting at most until `deadline` (by default `timeout` from now).
    public func receive(into buffer: UnsafeMutableRawBufferPointer, deadline: Date? = nil) throws {
        if !duplex { try flush() }
        var off = 0
        let deadline = deadline ?? Date().addingTimeInterval(timeout)
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
            let n = isFile ? read(fd, to, room) : recv(fd, to, room, Int32(MSG_DONTWAIT))
            if n == 0 {
                throw failure(isFile ? .badStream("the file ends early, after \(bytesReceived + UInt64(off)) bytes (truncated)")
                                     : .connection("the peer closed the connection after \(bytesReceived + UInt64(off)) bytes"))
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK {
                    try wait(Int16(POLLIN), until: deadline,
                             doing: "waiting for the peer (\(off) of \(buffer.count) bytes came)")
                    continue
                }
                throw failure(.connection("receive: \(String(cString: strerror(e)))"))
            }
            if direct { off += n } else { inputStart = 0; inputEnd = n }
        }
        bytesReceived += UInt64(buffer.count)
    }

    /// Waits, without a deadline, until the peer sends something or hangs up (a stop ends the wait):
    /// for a channel that is rightly silent for long, as post-copy's requests are. The record that
    /// follows is read with the timeout.
    func waitUntilReadable() throws {
        while inputStart >= inputEnd {
            try checkStopped()
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let rc = poll(&p, 1, 100)
            if rc > 0 { return }
            if rc < 0 && errno != EINTR { throw failure(.connection("poll: \(String(cString: strerror(errno)))")) }
        }
    }

    /// Stops this side's sending for good (what it queued still goes) and waits, up to `seconds`,
    /// until the peer has acknowledged all of it: from then on nothing more reaches the peer.
    func fence(within seconds: Double) {
        guard !isFile else { return }
        shutdown(fd, Int32(SHUT_WR))
        let deadline = Date().addingTimeInterval(seconds)
        while cvmm_unsent_bytes(fd) > 0 && Date() < deadline { usleep(10_000) }
    }

    /// Whether the peer has sent something not yet read (a source sending pages hears from its
    /// destination only when it stops: an ERROR).
    var peerHasSpoken: Bool {
        if inputStart < inputEnd { return true }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return !isFile && poll(&p, 1, 0) > 0
    }

    /// After telling the peer why this side stops: reads and drops what the peer still sends, until
    /// it closes or `seconds` pass, so the peer can read that reason before this side closes (a
    /// close with unread data would reset the connection under it).
    func drain(for seconds: Double) {
        guard !isFile else { return }
        shutdown(fd, Int32(SHUT_WR))
        let deadline = Date().addingTimeInterval(seconds)
        var scratch = [UInt8](repeating: 0, count: 64 << 10)
        while deadline.timeIntervalSinceNow > 0 {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, Int32(deadline.timeIntervalSinceNow * 1000) + 1) > 0 else { return }
            let n = scratch.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { return }
        }
    }

    public func receive(_ count: Int, deadline: Date? = nil) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        try b.withUnsafeMutableBytes { p in try receive(into: p, deadline: deadline) }
        return b
    }

    public static let maxChannels = 16
}


/// A listening socket, TCP or Unix.
public final class Listener: Sendable {
    private let descriptor: FileDescriptor
    private var fd: Int32 { descriptor.raw }
    /// What it listens on (with the port a port 0 picked).
    public let address: MigrationAddress
    private let unixPath: String?
    /// Connections accepted by a receive that ended before it could open them, for the next one.
    private let waiting = Mutex<[Connection]>([])
    func putBack(_ c: Connection) { waiting.withLock { $0.append(c) } }
    func takeBack() -> Connection? { waiting.withLock { $0.isEmpty ? nil : $0.removeFirst() } }

    /// Listens on `address` (port 0 picks a free one; `address` then names it). A Unix socket path
    /// that exists is replaced only if it is a socket nobody listens on.
    public init(_ address: MigrationAddress) throws {
        guard let target = try address.resolve(passive: true).first else { throw MigrationError.connection("\(address) resolves to nothing") }
        if case let .unix(path) = address {
            var st = stat()
            if stat(path, &st) == 0 {
                guard st.st_mode & S_IFMT == S_IFSOCK else { throw MigrationError.connection("listen on \(address): \(path) exists and is not a socket") }
                if (try? Connection.connect(to: address, timeout: 0)) != nil {
                    throw MigrationError.connection("listen on \(address): another process listens there")
                }
                unlink(path)
            }
        }
        let raw = socket(target.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard raw >= 0 else { throw MigrationError.connection("socket: \(String(cString: strerror(errno)))") }
        descriptor = FileDescriptor(owning: raw)   // closed on any failure below, with the listener
        let fd = raw
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard target.withSockaddr({ bind(fd, $0, $1) }) == 0, listen(fd, 16) == 0 else {
            let e = errno   // before the message is built
            throw MigrationError.connection("listen on \(address): \(String(cString: strerror(e)))")
        }
        switch address {
        case let .tcp(host, _):
            var bound = SocketAddress()
            bound.family = target.family
            bound.length = socklen_t(bound.storage.count)
            _ = bound.storage.withUnsafeMutableBytes { getsockname(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), &bound.length) }
            self.address = .tcp(host: host, port: bound.port)
            unixPath = nil
        case let .unix(path):
            self.address = address
            unixPath = path
        }
    }

    deinit {
        if let unixPath { unlink(unixPath) }
    }

    /// Accepts one connection within `timeout` seconds; its sends and receives get `ioTimeout`.
    /// A signal on `wake` ends the wait at once (cleared, thrown as `.cancelled`).
    public func accept(timeout: Double, ioTimeout: Double? = nil, wake: WakeEvent? = nil) throws -> Connection {
        var p = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wake?.raw ?? -1, events: Int16(POLLIN), revents: 0)]
        let rc = poll(&p, 2, Int32(min(max(0, timeout), 86_400) * 1000))
        guard rc > 0 else {
            throw rc == 0 ? MigrationError.timeout("no source connected to \(address) within \(formatDuration(timeout))")
                          : MigrationError.connection("poll: \(String(cString: strerror(errno)))")
        }
        if p[1].revents != 0 {
            wake?.clear()
            throw MigrationError.cancelled
        }
        let c = cvmm_accept_cloexec(fd)
        guard c >= 0 else { throw MigrationError.connection("accept: \(String(cString: strerror(errno)))") }
        return Connection(socket: FileDescriptor(owning: c), timeout: ioTimeout ?? timeout)
    }
}

/// Cancels a migration from any thread (Ctrl-C): every connection it watches is cancelled, and so
/// is any it watches later. The side rolls back and tells its peer.
public final class Cancellation: Sendable {
    private let state = Mutex<(connections: [Connection], waiters: [Int: @Sendable () -> Void], next: Int, cancelled: Bool)>(([], [:], 0, false))

    public init() {}

    public var isCancelled: Bool { state.withLock { $0.cancelled } }

    public func cancel() {
        let (all, waiters) = state.withLock { s in
            s.cancelled = true
            return (s.connections, s.waiters.values)
        }
        for c in all { c.cancel() }
        for wake in waiters { wake() }
    }

    /// Calls `wake` on `cancel` (at once if cancelled already) until `stopWaking` with the number it
    /// returns: a thread waiting on a condition for something else looks at the cancellation then.
    func whenCancelled(_ wake: @escaping @Sendable () -> Void) -> Int {
        let (id, now) = state.withLock { s in
            s.next += 1
            s.waiters[s.next] = wake
            return (s.next, s.cancelled)
        }
        if now { wake() }
        return id
    }

    func stopWaking(_ id: Int) { _ = state.withLock { $0.waiters.removeValue(forKey: id) } }

    public func watch(_ c: Connection) {
        let now = state.withLock { s in
            s.connections.append(c)
            return s.cancelled
        }
        if now { c.cancel() }
    }

    /// Lets go of the connections it watches (a finished migration's sockets then close).
    public func forget() {
        state.withLock { $0.connections = [] }
    }
}
