import Foundation
import FuzzSupport
import GuestMemory
@testable import Migration
import VirtualMachine

// The destination's side of a migration stream, as a hostile source would feed it: the opening and
// handshake (version 3 and later, or a version 2 header), then records applied to a real (small,
// reused) guest by the code a destination runs. The first input byte picks the mode:
//   bit 0  fixes the checksums (the version 2 header's and every record's), so mutations get past them;
//   bit 1  gives the destination a key: the handshake's proofs are checked (the fuzzer cannot forge
//          them, so bit 4 reaches what lies behind them);
//   bit 2  allows post-copy records (DISCARD, POSTCOPY), as a stream with a post-copy channel does;
//   bit 3  makes the records a further channel's;
//   bit 4  skips the handshake: the input's records (hostile plaintext) are sealed under a session
//          key as a source holding it seals them, and read through the destination's unsealing;
//   bit 5  splits the records between the main channel and a further one at the offset in the next
//          two input bytes, read at once by two threads meeting at one pass barrier, as a
//          destination reads its channels (the rules that span channels).

private let key = try! MigrationKey(bytes: [UInt8](repeating: 7, count: 32))
// One session's key to the destination (the nonces are arbitrary: any session's keys do).
nonisolated(unsafe) private let sessionKey = Handshake.sessionKeys(key, nonceS: [UInt8](repeating: 1, count: 32), nonceD: [UInt8](repeating: 2, count: 32)).toDestination
private let guest = GuestDescription(layout: RAMLayout(size: 1 << 20), vcpus: 1, backend: 0, backing: 0)

runFuzzer { data, size in
    guard let data, size > 0 else { return 0 }
    let mode = data[0]
    var bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    var split: Int?
    if mode & 32 != 0 {
        guard bytes.count >= 2 else { return 0 }
        split = Int(bytes[0]) | Int(bytes[1]) << 8
        bytes.removeFirst(2)
    }
    do {
        if mode & 16 != 0 {
            if mode & 1 != 0 { fixChecksums(&bytes, from: 0) }
            let (records, further) = divide(bytes, at: split)
            try apply(sealed(records), further.map(sealed), mode: mode)
        } else {
            if mode & 1 != 0 { fixStreamChecksums(&bytes) }
            let (opened, further) = divide(bytes, at: split.map { $0 + recordsStart(bytes) })
            let (c, writer) = connection(carrying: opened)
            defer { withExtendedLifetime(writer) {} }
            switch try Handshake.readOpening(c) {
            case .legacy(let prefix):
                _ = try Version2Header.read(from: c, prefix: prefix)   // the guest description is in it; records follow
            case .open(let open):
                try Handshake.accept(c, open: open, key: mode & 2 != 0 ? key : nil)
                // The GUEST record as the destination reads it, then what follows.
                let first = try Record.read(from: c, pageLimit: 0)
                _ = first.error(from: .source)
                if first.type == .guest { _ = try? GuestDescription.decode(first.payload, version: open.version, context: "") }
            }
            try apply((c, writer), further.map { connection(carrying: $0) }, mode: mode)
        }
    } catch {
        _ = "\(error)"   // every error must describe itself without trapping
    }
    return 0
}

/// Where a stream's records begin: after OPEN and CONFIRM (version 3 and later), or after a
/// version 2 header (its fixed part, length and checksum, and the guest description it sizes).
private func recordsStart(_ bytes: [UInt8]) -> Int {
    guard bytes.count >= 12, bytes.le(UInt32.self, at: 8) == 2 else { return Handshake.openSize + Handshake.confirmSize }
    guard bytes.count >= 32 else { return bytes.count }
    return min(bytes.count, 32 + Int(min(bytes.le(UInt32.self, at: 24), 8192)))
}

/// Fixes a version 2 header's checksum, if the stream has one, and every record's.
private func fixStreamChecksums(_ bytes: inout [UInt8]) {
    let start = recordsStart(bytes)
    if bytes.count >= 32, bytes.le(UInt32.self, at: 8) == 2 {
        let sum = RecordChecksum.checksum(Array(bytes[0..<28]) + bytes[32..<start])
        for k in 0..<4 { bytes[28 + k] = UInt8(truncatingIfNeeded: sum >> (8 * k)) }
    }
    fixChecksums(&bytes, from: start)
}

/// `bytes` cut at `offset` (clamped): the main channel's part and, with an offset, the other's.
private func divide(_ bytes: [UInt8], at offset: Int?) -> ([UInt8], [UInt8]?) {
    guard let offset else { return (bytes, nil) }
    let cut = min(offset, bytes.count)
    return (Array(bytes[..<cut]), Array(bytes[cut...]))
}

/// A connection carrying `records` (24-byte headers, payloads as long as they say, the last cut
/// short) sealed one by one as a source's session seals them, already unsealing on its reading end.
private func sealed(_ records: [UInt8]) throws -> (Connection, Connection) {
    let cipher = RecordCipher(key: sessionKey)
    var out: [UInt8] = []
    var o = 0
    while o < records.count {
        let h = Array(records[o..<min(records.count, o + Record.headerSize)])
        var pieces = [h]
        if h.count == Record.headerSize {
            let end = min(records.count, o + Record.headerSize + Int(h.le(UInt32.self, at: 16)))
            if end > o + Record.headerSize { pieces.append(Array(records[(o + Record.headerSize)..<end])) }
            o = end
        } else {
            o = records.count
        }
        for p in pieces {
            let (ciphertext, tag) = try p.withUnsafeBytes { try cipher.seal($0) }
            out += ciphertext
            out += tag
        }
    }
    let (c, writer) = connection(carrying: out)
    c.receiveCipher = RecordCipher(key: sessionKey)
    return (c, writer)
}

/// Applies the records on `main` (and on `further`, a second channel on a thread of its own, as a
/// destination reads its channels) to the reused guest.
private func apply(_ main: (Connection, Connection), _ further: (Connection, Connection)?, mode: UInt8) throws {
    defer { withExtendedLifetime((main.1, further?.1)) {} }
    let postcopy = mode & 4 != 0
    let digest = PageDigest(pages: fuzzGuest.pages)
    let barrier = PassBarrier(parties: further == nil ? 1 : 2, timeout: 1)
    @Sendable func records(_ c: Connection, main: Bool) throws {
        _ = try applyRecords(from: c, into: fuzzGuest, guest: guest, written: fuzzWritten, digest: digest, barrier: barrier,
                             main: main, postcopy: postcopy)
    }
    guard let (other, _) = further else {
        try records(main.0, main: mode & 8 == 0)
        return
    }
    let c = main.0
    let reader = ChannelReader(onFailure: { barrier.fail(); c.interrupt() }) { try records(other, main: false) }
    defer { reader.join() }
    do { try records(c, main: true) } catch {
        barrier.fail()
        other.interrupt()
        throw error
    }
}
