import Foundation
import FuzzSupport
import GuestMemory
@testable import Migration
import VirtualMachine

// The destination's side of a migration stream, as a hostile source would feed it: the opening and
// handshake, then records applied to a real (small, reused) guest by the code a destination runs.
// The first input byte picks the mode: bit 0 fixes the record checksums, bit 1 gives the
// destination a key, bit 2 allows post-copy records, bit 3 makes the records a further channel's.

private let key = try! MigrationKey(bytes: [UInt8](repeating: 7, count: 32))
private let guest = GuestDescription(layout: RAMLayout(size: 1 << 20), vcpus: 1, backend: 0, backing: 0)

runFuzzer { data, size in
    guard let data, size > 0 else { return 0 }
    let mode = data[0]
    var bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    if mode & 1 != 0 { fixChecksums(&bytes, from: min(bytes.count, Handshake.openSize)) }
    let (c, writer) = connection(carrying: bytes)
    defer { withExtendedLifetime(writer) {} }
    do {
        switch try Handshake.readOpening(c) {
        case .legacy(let prefix): _ = try Version2Header.read(from: c, prefix: prefix)
        case .open(let open): try Handshake.accept(c, open: open, key: mode & 2 != 0 ? key : nil)
        }
        // The GUEST record as the destination reads it, then what follows applied to the guest.
        let first = try Record.read(from: c, pageLimit: 0)
        _ = first.error(from: .source)
        if first.type == .guest { _ = try? GuestDescription.decode(first.payload, version: Handshake.version, context: "") }
        let barrier = PassBarrier(parties: 1, timeout: 1)
        if case let .end(state, _)? = try applyRecords(from: c, into: fuzzGuest, guest: guest, written: fuzzWritten, digest: PageDigest(pages: fuzzGuest.pages),
                                                       barrier: barrier, main: mode & 8 == 0, postcopy: mode & 4 != 0) {
            _ = state
        }
    } catch {
        _ = "\(error)"   // every error must describe itself without trapping
    }
    return 0
}
