import Crypto
import Foundation
import Glibc

/// A pre-shared key for the migration channel.
public struct MigrationKey: @unchecked Sendable {
    let key: SymmetricKey

    public init(bytes: [UInt8]) throws {
        guard bytes.count >= 16 else { throw MigrationError.badStream("a migration key needs at least 16 bytes (got \(bytes.count))") }
        key = SymmetricKey(data: bytes)
    }

    /// Reads a key file (its bytes are the key; at least 16 of them).
    public init(file: String) throws {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw MigrationError.connection("cannot read the key file \(file)")
        }
        try self.init(bytes: Array(data))
    }

    /// A random key, for a migration within one process.
    public static func random() -> MigrationKey { try! MigrationKey(bytes: (0..<32).map { _ in UInt8.random(in: 0...255) }) }
}

/// The handshake: each side proves it holds the key over both sides' fresh nonces, before any
/// guest memory moves; then every record carries an HMAC-SHA256 over a sequence number, its header
/// and its payload, under a session key derived from the nonces.
///
/// ```
/// source -> destination: "VMMAUTH1" nonceS(32)
/// destination -> source: nonceD(32) HMAC(key, "destination" nonceS nonceD)
/// source -> destination: HMAC(key, "source" nonceS nonceD)
/// session key = HMAC(key, "session" nonceS nonceD)
/// ```
enum Handshake {
    static let magic = Array("VMMAUTH1".utf8)

    static func proof(_ key: SymmetricKey, _ role: String, _ a: [UInt8], _ b: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Array(role.utf8) + a + b, using: key))
    }

    static func nonce() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255) } }

    /// The source's half; returns the session key.
    static func source(_ c: Connection, key: MigrationKey) throws -> SymmetricKey {
        let ns = nonce()
        try c.send(magic + ns)
        let reply = try c.receive(64)
        let nd = Array(reply[0..<32])
        guard constantTimeEqual(Array(reply[32..<64]), proof(key.key, "destination", ns, nd)) else {
            throw MigrationError.authentication("the destination does not hold the key: nothing was sent")
        }
        try c.send(proof(key.key, "source", ns, nd))
        return SymmetricKey(data: proof(key.key, "session", ns, nd))
    }

    /// The destination's half; returns the session key.
    static func destination(_ c: Connection, key: MigrationKey) throws -> SymmetricKey {
        let hello = try c.receive(40)
        guard Array(hello[0..<8]) == magic else { throw MigrationError.authentication("the source did not start an authenticated stream") }
        let ns = Array(hello[8..<40])
        let nd = nonce()
        try c.send(nd + proof(key.key, "destination", ns, nd))
        guard constantTimeEqual(try c.receive(32), proof(key.key, "source", ns, nd)) else {
            throw MigrationError.authentication("the source does not hold the key: nothing was accepted")
        }
        return SymmetricKey(data: proof(key.key, "session", ns, nd))
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var d: UInt8 = 0
        for i in a.indices { d |= a[i] ^ b[i] }
        return d == 0
    }
}

/// The per-record MAC state of one direction of a connection: GMAC (AES-256-GCM with no plaintext)
/// over the payload, keyed by the session key with the record's sequence number as the nonce (unique
/// per key and direction), then HMAC-SHA256 over the sequence number, the header and that tag. GMAC
/// runs at memory speed with AES-NI and carry-less multiply; an HMAC over every page would halve the
/// migration's bandwidth on these machines.
final class RecordMAC {
    let key: SymmetricKey
    private let direction: UInt32
    private var sequence: UInt64 = 0
    init(key: SymmetricKey, direction: UInt32) {
        self.key = key
        self.direction = direction
    }

    /// The MAC of the next record, over its sequence number, header and payload.
    func next(header: [UInt8], payload: UnsafeRawBufferPointer) -> [UInt8] {
        var nonceBytes = [UInt8](repeating: 0, count: 12)
        withUnsafeBytes(of: sequence.littleEndian) { nonceBytes.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: direction.littleEndian) { nonceBytes.replaceSubrange(8..<12, with: $0) }
        let tag: [UInt8]
        if let nonce = try? AES.GCM.Nonce(data: nonceBytes),
           let box = try? AES.GCM.seal([UInt8](), using: key, nonce: nonce, authenticating: payload) {
            tag = Array(box.tag)
        } else {
            tag = []
        }
        var h = HMAC<SHA256>(key: key)
        h.update(data: nonceBytes)
        h.update(data: header)
        h.update(data: tag)
        sequence += 1
        return Array(h.finalize())
    }
}
