import Crypto
import Foundation

/// How every connection of a migration opens (docs/migration-stream.md, "Opening"): the versions
/// the ends speak, whether both hold a key, and with a key a proof from each end over both ends'
/// fresh nonces, before anything else moves. Each end can refuse here with an ERROR record in clear
/// that the other prints as its own reason.
///
/// ```
/// OPEN    source -> destination  magic | version | flags | nonceS(32)                         48 bytes
/// ACCEPT  destination -> source  magic | oldest | newest | flags | status | nonceD(32) | proofD(32)  88 bytes
/// CONFIRM source -> destination  status | proofS(32)                                        36 bytes
/// ```
enum Handshake {
    static let magic = Array("VMMMIGR1".utf8)
    /// The stream version this build writes, and the oldest it reads; version 2 streams open with
    /// their own header, the others with OPEN.
    static let version: UInt32 = 6
    static let oldestVersion: UInt32 = 2
    static let oldestOpenVersion: UInt32 = 3
    static let openSize = 48, acceptSize = 88, confirmSize = 36
    static let keyed: UInt32 = 1, further: UInt32 = 2

    /// What OPEN asked.
    struct Open {
        var bytes: [UInt8]
        var version: UInt32 { bytes.le(UInt32.self, at: 8) }
        var keyed: Bool { bytes.le(UInt32.self, at: 12) & Handshake.keyed != 0 }
        var further: Bool { bytes.le(UInt32.self, at: 12) & Handshake.further != 0 }
        var nonce: [UInt8] { Array(bytes[16..<48]) }
    }

    static func nonce() -> [UInt8] {
        var rng = SystemRandomNumberGenerator()
        return (0..<4).flatMap { _ in withUnsafeBytes(of: rng.next()) { Array($0) } }
    }

    static func proof(_ key: MigrationKey, _ role: String, _ transcript: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Array(role.utf8) + transcript, using: key.key))
    }

    /// The two directions' session keys, from the shared key and both nonces.
    static func sessionKeys(_ key: MigrationKey, nonceS: [UInt8], nonceD: [UInt8]) -> (toDestination: SymmetricKey, toSource: SymmetricKey) {
        func derive(_ info: String) -> SymmetricKey {
            HKDF<SHA256>.deriveKey(inputKeyMaterial: key.key, salt: nonceS + nonceD, info: Array(info.utf8), outputByteCount: 32)
        }
        return (derive("vmm migration v3: source to destination"), derive("vmm migration v3: destination to source"))
    }

    // MARK: The source's half

    /// Opens a connection as the source (`further`: a further channel); afterwards records are
    /// sealed when a key is given. Throws the destination's reason if it refuses.
    static func open(_ c: Connection, key: MigrationKey?, further: Bool) throws {
        let nonceS = nonce()
        var open = magic
        open.append(le: version)
        open.append(le: (key == nil ? 0 : keyed) | (further ? Handshake.further : 0))
        open += nonceS
        try c.send(open)
        let accept: [UInt8]
        do {
            accept = try c.receive(acceptSize)
        } catch let e as MigrationError where e.code == .connection && c.bytesReceived == 0 {
            throw MigrationError(.version, "the destination closed the connection without answering: it may be an older vmm that reads "
                                 + "only version 2 streams (this source writes version \(version)); update it")
        }
        guard Array(accept[0..<8]) == magic else { throw MigrationError.badStream("the destination's answer does not start with \(String(decoding: magic, as: UTF8.self))") }
        let oldest = accept.le(UInt32.self, at: 8), newest = accept.le(UInt32.self, at: 12)
        if accept.le(UInt32.self, at: 20) != 0 { throw try peerError(c, .destination) }
        guard (oldest...max(oldest, newest)).contains(version) else {
            throw try refuse(c, MigrationError(.version, "the source writes stream version \(version); the destination reads versions "
                                               + "\(oldest) to \(newest): update the older end"))
        }
        let nonceD = Array(accept[24..<56])
        if let key {
            guard Handshake.constantTimeEqual(Array(accept[56..<88]), proof(key, "destination", open + accept[0..<56])) else {
                throw try refuse(c, MigrationError(.keyMismatch, "the two ends hold different keys: use the same --key-file on both ends"))
            }
            var confirm: [UInt8] = []
            confirm.append(le: UInt32(0))
            try c.send(confirm + proof(key, "source", open + accept))
            let keys = sessionKeys(key, nonceS: nonceS, nonceD: nonceD)
            c.sendCipher = RecordCipher(key: keys.toDestination)
            c.receiveCipher = RecordCipher(key: keys.toSource)
        } else {
            try c.send([UInt8](repeating: 0, count: confirmSize))
        }
        try c.flush()
    }

    /// Sends a non-zero CONFIRM status and `error` in clear; returns it to throw.
    private static func refuse(_ c: Connection, _ error: MigrationError) throws -> MigrationError {
        var confirm: [UInt8] = []
        confirm.append(le: UInt32(1))
        try? c.send(confirm + [UInt8](repeating: 0, count: 32))
        try? c.sendError(error)
        return error
    }

    /// Reads the ERROR record that follows a refusal (in clear) and returns it as the peer's reason.
    private static func peerError(_ c: Connection, _ side: MigrationError.Side) throws -> MigrationError {
        let r = try Record.read(from: c, pageLimit: 0)
        guard r.type == .error, let e = r.error(from: side) else { return .badStream("the \(side) refused without saying why") }
        return e
    }

    // MARK: The destination's half

    /// What the first bytes on a connection are.
    enum Opening {
        /// A version 3 (or later) OPEN.
        case open(Open)
        /// A version 2 stream header's first 12 bytes (magic and version); the rest of it follows.
        case legacy([UInt8])
    }

    /// Reads the first bytes a source sent.
    static func readOpening(_ c: Connection) throws -> Opening {
        let first = try c.receive(12)
        if Array(first[0..<8]) == Array("VMMAUTH1".utf8) {
            throw MigrationError(.version, "a version 2 source with a key connected: this destination takes version 2 streams only without "
                                 + "a key (version 2's answer is not authenticated); update the source")
        }
        guard Array(first[0..<8]) == magic else { throw MigrationError.badStream("not a migration stream (bad magic)") }
        let v = first.le(UInt32.self, at: 8)
        if v == 2 { return .legacy(first) }
        return .open(Open(bytes: first + (try c.receive(openSize - 12))))
    }

    /// Answers an OPEN as the destination: refuses with `refusal` (busy), or with a reason of its
    /// own (version, a key on one side only), or runs the key proof; afterwards records are sealed
    /// when a key is given. Throws why it refused, or the source's reason.
    static func accept(_ c: Connection, open: Open, key: MigrationKey?, refusal: MigrationError? = nil) throws {
        var problem = refusal
        if problem == nil && !(oldestOpenVersion...version).contains(open.version) {
            problem = MigrationError(.version, "the source writes stream version \(open.version); this destination reads versions "
                                     + "\(oldestVersion) to \(version): update the older end")
        }
        if problem == nil && open.keyed != (key != nil) {
            problem = MigrationError(.keyOnOneSide, open.keyed
                ? "the source has a key and the destination none: give both ends the same --key-file"
                : "the destination has a key and the source none: give both ends the same --key-file")
        }
        let nonceD = nonce()
        var accept = magic
        accept.append(le: oldestVersion)
        accept.append(le: version)
        accept.append(le: key == nil ? 0 : keyed)
        accept.append(le: UInt32(problem == nil ? 0 : 1))
        accept += nonceD
        accept += key.map { proof($0, "destination", open.bytes + accept) } ?? [UInt8](repeating: 0, count: 32)
        try c.send(accept)
        if let problem {
            try? c.sendError(problem)
            throw problem
        }
        let confirm = try c.receive(confirmSize)
        if confirm.le(UInt32.self, at: 0) != 0 { throw try peerError(c, .source) }
        if let key {
            guard Handshake.constantTimeEqual(Array(confirm[4..<36]), proof(key, "source", open.bytes + accept)) else {
                let e = MigrationError.authentication("the source's proof of the key is wrong: the handshake was altered; nothing was accepted")
                try? c.sendError(e)
                throw e
            }
            let keys = sessionKeys(key, nonceS: open.nonce, nonceD: nonceD)
            c.sendCipher = RecordCipher(key: keys.toSource)
            c.receiveCipher = RecordCipher(key: keys.toDestination)
        }
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var d: UInt8 = 0
        for i in a.indices { d |= a[i] ^ b[i] }
        return d == 0
    }
}
