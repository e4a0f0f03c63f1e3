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
//   bit 5  deals the records to the main channel and a further one, read at once by two threads
//          meeting at one pass barrier, as a destination reads its channels: PAGES records
//          alternate, SYNC goes to both (so a good stream stays good), the rest to the main one;
//          the next input byte's bit k sends the k-th SYNC to one channel only (the rules that span
//          channels: they must agree on every pass).

private let key = try! MigrationKey(bytes: [UInt8](repeating: 7, count: 32))
// One session's key to the destination (the nonces are arbitrary: any session's keys do).
nonisolated(unsafe) private let sessionKey = Handshake.sessionKeys(key, nonceS: [UInt8](repeating: 1, count: 32), nonceD: [UInt8](repeating: 2, count: 32)).toDestination
/// The guest a stream without a GUEST record (sealed mode) describes: the version 3 fixture's.
private let fixtureGuest = {
    var g = GuestDescription(layout: RAMLayout(size: 4 << 20), vcpus: 1, backend: 0, backing: 0)
    g.legacySpec = "pattern=zipf:0.8,base=0x0,ws=64K,write=0.3,size=8,seed=1,duration=3600.0s"
    return g
}()

runFuzzer { data, size in
    guard let data, size > 0 else { return 0 }
    let mode = data[0]
    var bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    var lone: UInt8?
    if mode & 32 != 0 {
        guard !bytes.isEmpty else { return 0 }
        lone = bytes.removeFirst()
    }
    do {
        if mode & 16 != 0 {
            if mode & 1 != 0 { fixChecksums(&bytes, from: 0) }
            let (records, further) = deal(bytes, from: 0, lone: lone)
            guard let main = try sealed(records) else { return 0 }
            var other: (Connection, Connection)?
            if let further {
                guard let f = try sealed(further) else { return 0 }
                other = f
            }
            try apply(main, other, guest: fixtureGuest, mode: mode)
        } else {
            if mode & 1 != 0 { fixStreamChecksums(&bytes) }
            let (opened, further) = deal(bytes, from: recordsStart(bytes), lone: lone)
            let (c, writer) = connection(carrying: opened)
            defer { withExtendedLifetime(writer) {} }
            var guest = fixtureGuest
            switch try Handshake.readOpening(c) {
            case .legacy(let prefix):
                guest = try Version2Header.read(from: c, prefix: prefix).guest   // records follow
            case .open(let open):
                try Handshake.accept(c, open: open, key: mode & 2 != 0 ? key : nil)
                // The GUEST record as the destination reads it, then what follows.
                let first = try Record.read(from: c, pageLimit: 0)
                _ = first.error(from: .source)
                if first.type == .guest { guest = try GuestDescription.decode(first.payload, version: open.version, context: "") }
            }
            // Its memory is the reused guest's: a description of another size is read, not applied.
            guard guest.layout.size == fuzzGuest.ram.size else { return 0 }
            try apply((c, writer), further.map { connection(carrying: $0) }, guest: guest, mode: mode)
        }
    } catch {
        describe(error)
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
    if bytes.count >= 12, bytes.le(UInt32.self, at: 8) == 2 { fixSealedHeader(&bytes, fixedSize: 24) }
    fixChecksums(&bytes, from: recordsStart(bytes))
}

/// The records of `bytes` from `start` walked by their headers (the last one cut short), each
/// with its type byte.
private func records(_ bytes: [UInt8], from start: Int) -> [(type: UInt8, bytes: ArraySlice<UInt8>)] {
    var out: [(UInt8, ArraySlice<UInt8>)] = []
    var o = start
    while o < bytes.count {
        let end = o + Record.headerSize <= bytes.count ? min(bytes.count, o + Record.headerSize + Int(bytes.le(UInt32.self, at: o + 16))) : bytes.count
        out.append((bytes[o], bytes[o..<end]))
        o = end
    }
    return out
}

/// Without `lone`, `bytes` as they are, on one channel. With it, what precedes `start` and the
/// records after it dealt to a main and a further channel: PAGES alternate, SYNC goes to both
/// (the k-th to one only where bit k of `lone` is set, alternating), the rest to the main one.
private func deal(_ bytes: [UInt8], from start: Int, lone: UInt8?) -> ([UInt8], [UInt8]?) {
    guard let lone else { return (bytes, nil) }
    var main = Array(bytes[..<min(start, bytes.count)]), further: [UInt8] = []
    var pages = 0, syncs = 0
    for (type, record) in records(bytes, from: min(start, bytes.count)) {
        switch type {
        case RecordType.pages.rawValue:
            if pages % 2 == 0 { main += record } else { further += record }
            pages += 1
        case RecordType.sync.rawValue:
            if syncs < 8 && lone & (1 << syncs) != 0 {
                if syncs % 2 == 0 { main += record } else { further += record }
            } else {
                main += record
                further += record
            }
            syncs += 1
        default:
            main += record
        }
    }
    return (main, further)
}

/// A connection carrying `records` (24-byte headers, payloads as long as they say, the last cut
/// short) sealed one by one as a source's session seals them, already unsealing on its reading end;
/// nil if sealed they would outgrow what a socket pair holds unread (each seal adds 16 bytes).
private func sealed(_ records: [UInt8]) throws -> (Connection, Connection)? {
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
    guard out.count <= 256 << 10 else { return nil }
    let (c, writer) = connection(carrying: out)
    c.receiveCipher = RecordCipher(key: sessionKey)
    return (c, writer)
}

/// Applies the records on `main` (and on `further`, a second channel on a thread of its own, as a
/// destination reads its channels) to the reused guest.
private func apply(_ main: (Connection, Connection), _ further: (Connection, Connection)?, guest: GuestDescription, mode: UInt8) throws {
    defer { withExtendedLifetime((main.1, further?.1)) {} }
    let postcopy = mode & 4 != 0
    let digest = PageDigest(pages: fuzzGuest.pages)
    let barrier = PassBarrier(parties: further == nil ? 1 : 2, timeout: 0.2)   // a lone SYNC waits this long
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
