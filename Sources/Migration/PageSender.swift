import Foundation
import GuestMemory
import DirtyLog
import Synchronization
import VirtualMachine

/// Sends the pages a bitmap names as PAGES records: runs of up to 256 pages inside one slot, all-zero
/// runs as a flag.
final class PageSender {
    let ram: GuestRAM
    let connection: Connection
    /// The memory digest the pages sent go into (shared by a migration's channels).
    let digest: PageDigest
    /// A run is copied here before it is checksummed and sent: the guest keeps writing its memory
    /// meanwhile (a page changed after the copy is dirty again and goes in a later iteration).
    private let staging: UnsafeMutableRawPointer
    /// Called after each record with the pages it held.
    var tick: ((UInt64) -> Void)?

    init(ram: GuestRAM, connection: Connection, digest: PageDigest) {
        self.ram = ram
        self.connection = connection
        self.digest = digest
        staging = .allocate(byteCount: Int(Record.maxPagesPerRecord) << 12, alignment: 4096)
    }

    deinit { staging.deallocate() }

    /// Sends the pages `bitmap` names (in its words `words`, by default all).
    func send(_ bitmap: [UInt64], words: Range<Int>? = nil, report: inout MigrationReport) throws {
        var failure: Error?
        var sums = DigestSums()
        defer { digest.add(sums) }
        forEachRun(bitmap, words: words) { start, count in
            guard failure == nil else { return }
            do { try send(start, count: count, sums: &sums, report: &report) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Sends pages `start..<start+count`: runs of zero pages, or of non-zero pages, each up to 256
    /// pages and never beyond a slot.
    func send(_ start: UInt64, count: UInt64, sums: inout DigestSums, report: inout MigrationReport) throws {
        // Sealed records stay small: each seal allocates its output, and at this size the allocator
        // reuses memory instead of mapping (and faulting in) fresh pages for every record.
        let maxRun = UInt64(connection.sendCipher == nil ? Record.maxPagesPerRecord : Record.maxPagesPerSealedRecord)
        var p = start
        let end = start + count
        while p < end {
            let (host, slotEnd) = ram.location(page: p)
            let runEnd = min(end, slotEnd)
            let zero = isZeroPage(host)
            var n: UInt64 = 1
            while p + n < runEnd && n < maxRun && isZeroPage(host + Int(n << 12)) == zero { n += 1 }
            // A sealed payload is read once by the cipher; a clear one is copied first, so its
            // checksum covers exactly the bytes sent.
            let sealed = connection.sendCipher != nil
            if !zero && !sealed { staging.copyMemory(from: host, byteCount: Int(n << 12)) }
            let source = UnsafeRawPointer(sealed ? host : staging)
            // Hashed as sent (from the copy, or from memory a sealed record read): a page that
            // changes after this is dirty and goes again, so its last send is what memory holds.
            for i in 0..<n { digest.set(p + i, zero ? nil : source + Int(i << 12), &sums) }
            let payload = UnsafeRawBufferPointer(start: zero ? nil : source, count: zero ? 0 : Int(n << 12))
            try connection.sendRecord(.pages, zero: zero, count: UInt32(n), firstPage: p, payload: payload)
            report.pagesSent += n
            if zero { report.zeroPages += n }
            p += n
            tick?(n)
        }
    }
}
