import CVMMSys
import Foundation
import Glibc
import HostSystem

/// An error a command answers with, in QMP's shape: a class and a description that says what to do.
public struct QMPError: Error, CustomStringConvertible, Sendable {
    public var errorClass: String
    public var desc: String
    public init(_ errorClass: String = "GenericError", _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }
    public var description: String { desc }
    public static func generic(_ desc: String) -> QMPError { QMPError("GenericError", desc) }
    var json: JSON { .object([("class", .string(errorClass)), ("desc", .string(desc))]) }
}

/// What the server runs a command with: its name and arguments; returns the answer's `return`.
public protocol CommandHandler: AnyObject, Sendable {
    func run(_ name: String, _ arguments: Arguments) throws -> JSON
    /// The commands it knows, for query-commands.
    var commandNames: [String] { get }
    /// Called once the answer to a command went out (`quit` shuts down only then).
    func answered(_ name: String)
}

/// The control socket: QMP's wire format on a Unix socket (docs/control-socket.md). Each client gets
/// the greeting, must negotiate with `qmp_capabilities`, then sends JSON objects, each ended by its
/// closing brace or by a newline, whichever comes first (QEMU's own clients send no newline); every
/// request gets exactly one answer, in order, and negotiated clients also get every event. A client
/// that sends garbage gets an error and stays connected; one that stops reading is dropped. At most
/// `maxClients` at a time; a longer line than `maxLine` is answered with an error and skipped.
public final class ControlServer: @unchecked Sendable {   // clients under its lock; each client has a thread
    public static let maxLine = 64 << 10
    public static let maxClients = 16
    public let path: String
    /// Closed by `stop`: the server may outlive it (a VM's event sink can hold it).
    private var listening: FileDescriptor?
    private let handler: CommandHandler
    private let greeting: JSON
    private let lock = NSLock()
    private var clients: [Client] = []
    private var stopped = false
    /// Set once the accept thread runs; an init that throws before leaves it false.
    private var accepting = false
    private let acceptDone = DispatchSemaphore(value: 0)
    /// Ends the accept thread's wait when the server stops.
    private let stopping: WakeEvent
    /// Events go out from here, so whoever emits (a migration mid-pass) never waits on a client.
    private let eventQueue = DispatchQueue(label: "control-events")

    /// Listens on `path` (mode 600). A stale socket there is replaced; a live one is refused.
    public init(path: String, handler: CommandHandler, version: String) throws {
        self.path = path
        self.handler = handler
        stopping = try WakeEvent()
        greeting = .object([("QMP", .object([
            ("version", .object([("qemu", .object([("micro", .int(0)), ("minor", .int(0)), ("major", .int(0))])),
                                 ("package", .string("vmm \(version)"))])),
            ("capabilities", .array([])),
        ]))])
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw QMPError.generic("--api \(path): a Unix socket path is at most \(MemoryLayout.size(ofValue: addr.sun_path) - 1) bytes")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        var st = stat()
        if stat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw QMPError.generic("--api \(path): the path exists and is not a socket") }
            let probe = FileDescriptor(owning: try system("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) })
            let live = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(probe.raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } } == 0
            if live { throw QMPError.generic("--api \(path): another process serves that socket") }
            unlink(path)
        }
        let socketFD = FileDescriptor(owning: try system("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) })
        let fd = socketFD.raw
        // Private from the moment it exists: no other user can connect between bind and a chmod.
        let mask = umask(0o177)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        umask(mask)
        guard bound == 0, listen(fd, 16) == 0 else {
            let e = errno
            throw QMPError.generic("--api \(path): \(String(cString: strerror(e)))")
        }
        listening = consume socketFD
        accepting = true
        let t = Thread { [self] in acceptLoop(fd) }
        t.name = "control-accept"
        t.start()
    }

    /// Sends an event to every client that negotiated.
    public func emit(_ event: String, _ data: JSON = .object([])) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let line = JSON.object([("event", .string(event)), ("data", data),
                                ("timestamp", .object([("seconds", .int(Int64(now.tv_sec))), ("microseconds", .int(Int64(now.tv_nsec / 1000)))]))])
        eventQueue.async { [self] in
            lock.lock()
            let all = clients
            lock.unlock()
            for c in all where c.negotiated { c.send(line) }
        }
    }

    /// Stops accepting, disconnects every client and removes the socket. Waits for the threads.
    public func stop() {
        lock.lock()
        // An init that threw never listened (the path may be another process's live socket): nothing to undo.
        let already = stopped || !accepting
        stopped = true
        let all = clients
        lock.unlock()
        if already { return }
        stopping.signal()
        acceptDone.wait()
        eventQueue.sync {}   // the last events (SHUTDOWN) go out first
        for c in all { c.close() }
        for c in all { c.done.wait() }
        listening = nil
        unlink(path)
    }

    deinit { stop() }

    private var isStopped: Bool { lock.lock(); defer { lock.unlock() }; return stopped }

    private func acceptLoop(_ fd: Int32) {
        while !isStopped {
            var p = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopping.raw, events: Int16(POLLIN), revents: 0)]
            guard poll(&p, 2, -1) > 0, p[1].revents == 0 else { continue }
            let c = cvmm_accept_cloexec(fd)
            guard c >= 0 else {
                if errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS { stopping.sleep(0.1) }   // do not spin while out of them
                continue
            }
            let client = Client(fd: c)
            lock.lock()
            let full = clients.count >= Self.maxClients || stopped
            if !full { clients.append(client) }
            lock.unlock()
            if full {
                client.send(.object([("error", QMPError.generic("too many clients: at most \(Self.maxClients) at a time").json)]))
                client.close()
                continue
            }
            let t = Thread { [self] in
                serve(client)
                client.close()
                lock.lock()
                clients.removeAll { $0 === client }
                lock.unlock()
                client.done.signal()
            }
            t.name = "control-client"
            t.start()
        }
        acceptDone.signal()
    }

    /// One client's session: greeting, then a request per line until it leaves or `stop` shuts its
    /// socket. Not before: a session that ended when it saw the server stopping would close its
    /// client before `stop` sent the last events (SHUTDOWN, found by a test of quit's events).
    func serve(_ client: Client) {
        client.send(greeting)
        while let line = client.readLine() {
            switch line {
            case .tooLong:
                client.send(.object([("error", QMPError.generic("a line longer than \(Self.maxLine) bytes was discarded").json)]))
            case let .text(bytes):
                if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
                let (reply, ran) = answer(bytes, client)
                client.send(reply)
                // Events only after the negotiation's answer, as QEMU does.
                if ran == "qmp_capabilities" { client.negotiated = true }
                if let ran { handler.answered(ran) }
            }
        }
    }

    /// The answer to one request line, and the command that ran successfully, if one did.
    func answer(_ bytes: [UInt8], _ client: Client) -> (JSON, String?) {
        let request: JSON
        do { request = try JSON.parse(bytes) } catch {
            return (.object([("error", QMPError.generic("\(error)").json)]), nil)
        }
        let reply = respond(request, client)
        return (reply, reply["return"] != nil ? request["execute"]?.string : nil)
    }

    private func respond(_ request: JSON, _ client: Client) -> JSON {
        let id = request["id"]
        func reply(_ body: (String, JSON)) -> JSON { .object([body] + (id.map { [("id", $0)] } ?? [])) }
        func fail(_ e: QMPError) -> JSON { reply(("error", e.json)) }
        guard case let .object(pairs) = request else { return fail(.generic("QMP input must be a JSON object")) }
        if let extra = pairs.first(where: { !["execute", "arguments", "id"].contains($0.0) }) {
            return fail(.generic("QMP input member '\(extra.0)' is unexpected"))
        }
        guard let name = request["execute"]?.string else { return fail(.generic("QMP input member 'execute' must be a string naming a command")) }
        let arguments: Arguments
        switch request["arguments"] {
        case nil: arguments = Arguments([])
        case let .object(a)?: arguments = Arguments(a)
        case let other?: return fail(.generic("QMP input member 'arguments' must be an object, not \(other.kind)"))
        }
        if !client.negotiated {
            guard name == "qmp_capabilities" else {
                return fail(QMPError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"))
            }
            return reply(("return", .object([])))
        }
        if name == "qmp_capabilities" {
            return fail(QMPError("CommandNotFound", "Capabilities negotiation is already complete, command ignored"))
        }
        if name == "query-commands" {
            return reply(("return", .array((["qmp_capabilities", "query-commands"] + handler.commandNames).map { .object([("name", .string($0))]) })))
        }
        do {
            return reply(("return", try handler.run(name, arguments)))
        } catch let e as QMPError {
            return fail(e)
        } catch {
            return fail(.generic("\(error)"))
        }
    }

    /// One connected client.
    final class Client: @unchecked Sendable {   // writes under `writeLock`; reads on its own thread
        private let socket: FileDescriptor
        var fd: Int32 { socket.raw }
        private let writeLock = NSLock()
        private var buffer: [UInt8] = []
        private var head = 0   // where the bytes not yet framed begin in `buffer`
        private var chunk: [UInt8] = []   // what one recv reads into, made on the first
        private var discarding = false
        /// How far `frameEnd` has read `buffer`, and what it was inside there: kept across reads, and
        /// across the bytes dropped from a request too long, so framing never restarts mid-object.
        private var scan = FrameScan()
        struct FrameScan { var at = 0, depth = 0, inString = false, escaped = false }
        private var closed = false
        let done = DispatchSemaphore(value: 0)
        /// Set once, by the client's own thread; read by emitters.
        private let flag = NSLock()
        private var _negotiated = false
        var negotiated: Bool {
            get { flag.lock(); defer { flag.unlock() }; return _negotiated }
            set { flag.lock(); _negotiated = newValue; flag.unlock() }
        }

        /// Takes ownership of the connected socket `fd`.
        init(fd: Int32) {
            socket = FileDescriptor(owning: fd)
            // A client that stops reading is dropped after this long rather than holding up events.
            var t = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &t, socklen_t(MemoryLayout<timeval>.size))
        }

        enum Line { case text([UInt8]), tooLong }

        /// Where the next frame in `buffer` ends: at a newline, or at the brace or bracket that closes
        /// a top-level object or array (outside strings), whichever comes first.
        private func frameEnd() -> (end: Int, consumed: Int)? {
            var s = scan
            defer { scan = s }
            while s.at < buffer.count {
                let k = s.at, b = buffer[k]
                s.at += 1
                if b == 0x0A { s = FrameScan(at: k + 1); return (k, k + 1) }
                if s.inString {
                    if s.escaped { s.escaped = false } else if b == UInt8(ascii: "\\") { s.escaped = true } else if b == UInt8(ascii: "\"") { s.inString = false }
                    continue
                }
                switch b {
                case UInt8(ascii: "\""): s.inString = true
                case UInt8(ascii: "{"), UInt8(ascii: "["): s.depth += 1
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    s.depth -= 1
                    if s.depth == 0 { s = FrameScan(at: k + 1); return (k + 1, k + 1) }
                    if s.depth < 0 { s.depth = 0 }   // a stray closer: the newline ends this garbage
                default: break
                }
            }
            return nil
        }

        /// The next frame, or nil once the client is gone (or the server stops: `close` shuts the socket).
        /// Frames are taken from `head` on, and the rest moved down only before a read, so a burst of
        /// many requests costs no more than its bytes.
        func readLine() -> Line? {
            while true {
                if let (end, consumed) = frameEnd() {
                    let line = Array(buffer[head..<end])
                    head = consumed
                    if discarding { discarding = false; return .tooLong }
                    if line.count > ControlServer.maxLine { return .tooLong }
                    return .text(line)
                }
                buffer.removeSubrange(..<head)
                scan.at -= head
                head = 0
                if buffer.count > ControlServer.maxLine {
                    buffer.removeAll(keepingCapacity: true)
                    scan.at = 0
                    discarding = true
                }
                if chunk.isEmpty { chunk = [UInt8](repeating: 0, count: 16 << 10) }
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return nil }
                buffer += chunk[..<n]
            }
        }

        func send(_ message: JSON) {
            var bytes = message.utf8
            bytes += [0x0D, 0x0A]
            writeLock.lock()
            defer { writeLock.unlock() }
            guard !closed else { return }
            var off = 0
            while off < bytes.count {
                let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    // Gone, or not reading: drop it (its reader sees the shutdown).
                    shutdown(fd, Int32(SHUT_RDWR))
                    return
                }
                off += n
            }
        }

        func close() {
            writeLock.lock()
            defer { writeLock.unlock() }
            guard !closed else { return }
            closed = true
            shutdown(fd, Int32(SHUT_RDWR))
        }

    }
}

/// A command's arguments, checked as they are read: a wrong type or an argument the command does
/// not take is an error naming it, in QEMU's words.
public struct Arguments: Sendable {
    let pairs: [(String, JSON)]
    public init(_ pairs: [(String, JSON)]) { self.pairs = pairs }

    public subscript(key: String) -> JSON? { pairs.first { $0.0 == key }?.1 }

    /// Refuses any argument not in `allowed`.
    public func only(_ allowed: Set<String>) throws {
        if let extra = pairs.first(where: { !allowed.contains($0.0) }) { throw QMPError.generic("Parameter '\(extra.0)' is unexpected") }
    }

    private func typed<T>(_ key: String, _ expected: String, _ get: (JSON) -> T?) throws -> T? {
        guard let v = self[key] else { return nil }
        guard let t = get(v) else { throw QMPError.generic("Invalid parameter type for '\(key)', expected: \(expected)") }
        return t
    }
    public func string(_ key: String) throws -> String? { try typed(key, "string") { $0.string } }
    public func int(_ key: String) throws -> Int64? { try typed(key, "integer") { $0.int } }
    public func number(_ key: String) throws -> Double? { try typed(key, "number") { $0.double } }
    public func bool(_ key: String) throws -> Bool? { try typed(key, "boolean") { $0.bool } }

    public func required<T>(_ key: String, _ get: (String) throws -> T?) throws -> T {
        guard let v = try get(key) else { throw QMPError.generic("Parameter '\(key)' is missing") }
        return v
    }
}
