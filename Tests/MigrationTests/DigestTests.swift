import Foundation
import Glibc
import Testing
@testable import GuestMemory
@testable import Migration

/// The memory digest kept as pages go (version 5) is the digest of memory as it ends up, whatever
/// the order pages were written, rewritten and zeroed in; and it tells apart memory that differs
/// by one word, or by where a page sits.
@Suite struct DigestTests {
    @Test func runningDigestEqualsMemory() throws {
        let ram = try GuestRAM(layout: RAMLayout(parsing: "4M,2M@1G"), backing: .pages4K)
        let digest = PageDigest(pages: ram.pages)
        // Two "channels", each with its own sums, as a pass's senders have.
        var sums = [DigestSums(), DigestSums()]
        for i in 0..<20_000 {
            let p = UInt64.random(in: 0..<ram.pages)
            let page = ram.pointer(page: p)
            switch Int.random(in: 0..<4) {
            case 0:
                memset(page, 0, 4096)
                digest.set(p, Bool.random() ? nil : page, &sums[i % 2])   // zeros, as a flag or as data
            default:
                page.storeBytes(of: UInt64.random(in: 1...UInt64.max), toByteOffset: Int.random(in: 0..<512) * 8, as: UInt64.self)
                digest.set(p, page, &sums[i % 2])
            }
        }
        for s in sums { digest.add(s) }
        #expect(digest.value == memoryDigest(ram))

        // One word changed behind the digest's back.
        let before = memoryDigest(ram)
        let word = ram.pointer(page: 9).advanced(by: 64)
        word.storeBytes(of: word.load(as: UInt64.self) ^ 1, as: UInt64.self)
        #expect(memoryDigest(ram) != before && digest.value != memoryDigest(ram))

        // The same bytes at another page.
        let other = try GuestRAM(layout: RAMLayout(parsing: "4M,2M@1G"), backing: .pages4K)
        let moved = try GuestRAM(layout: RAMLayout(parsing: "4M,2M@1G"), backing: .pages4K)
        memset(other.pointer(page: 3), 0x5A, 4096)
        memset(moved.pointer(page: 4), 0x5A, 4096)
        #expect(memoryDigest(other) != memoryDigest(moved))
    }
}
