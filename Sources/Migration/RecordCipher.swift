import Crypto
import Foundation

/// The sealing of one direction of one connection: AES-256-GCM under that direction's session key,
/// the nonce the record's sequence number (each key seals each nonce once: keys differ per direction
/// and per connection, sequence numbers only grow). A record's header and its payload are sealed one
/// after the other, so a reader of the wire sees neither page data nor which pages move, only sizes.
final class RecordCipher {
    static let tagSize = 16
    private let key: SymmetricKey
    private var sequence: UInt64 = 0

    init(key: SymmetricKey) { self.key = key }

    private func nextNonce() -> AES.GCM.Nonce {
        var n = [UInt8](repeating: 0, count: 12)
        withUnsafeBytes(of: sequence.littleEndian) { n.replaceSubrange(0..<8, with: $0) }
        sequence += 1
        return try! AES.GCM.Nonce(data: n)
    }

    /// Ciphertext and tag of `plaintext`.
    func seal(_ plaintext: UnsafeRawBufferPointer) throws -> (Data, Data) {
        let box = try AES.GCM.seal(plaintext, using: key, nonce: nextNonce())
        return (box.ciphertext, box.tag)
    }

    /// The plaintext of `ciphertext`, or nil if it was altered (or sealed under another key or out of
    /// order).
    func open(_ ciphertext: UnsafeRawBufferPointer, tag: UnsafeRawBufferPointer) -> Data? {
        let nonce = nextNonce()
        guard let box = try? AES.GCM.SealedBox(nonce: nonce, ciphertext: ciphertext, tag: tag) else { return nil }
        return try? AES.GCM.open(box, using: key)
    }
}
