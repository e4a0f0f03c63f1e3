import Testing
@testable import GuestMemory

@Suite struct GuestRAMTests {
    @Test func layoutsParseAndPlaceSlots() throws {
        let one = try RAMLayout(parsing: "512M")
        #expect(one.regions == [RAMLayout.Region(gpa: GPA(0), size: 512 << 20)])
        #expect(one.gpa(linear: 0x1234) == GPA(0x1234))

        let three = try RAMLayout(parsing: "1G,2M,6G@0x100000000")
        #expect(three.regions.map(\.gpa.raw) == [0, 1 << 30, 1 << 32])
        #expect(three.size == (1 << 30) + (2 << 20) + (6 << 30))
        // Linear addresses run across the slots in order, over the hole below 4 GiB.
        #expect(three.gpa(linear: (1 << 30) - 8) == GPA((1 << 30) - 8))
        #expect(three.gpa(linear: (1 << 30) + 5) == GPA((1 << 30) + 5))
        #expect(three.gpa(linear: (1 << 30) + (2 << 20)) == GPA(1 << 32))
        #expect(three.gpa(linear: (1 << 30) + (2 << 20) + (5 << 30)) == GPA((1 << 32) + (5 << 30)))
        #expect(try RAMLayout(parsing: three.argument) == three)
    }

    @Test func badLayoutsSayWhatIsWrong() {
        for (text, words) in [("", "not a size"), ("1G@1M", "GPA 0"), ("1G,3M", "2 MiB"), ("1G,1G@512M", "overlaps"),
                              ("1G,x", "not a size"), ("1G,1G@zz", "not an address"), ("1G,1G@256T", "48-bit"),
                              // Sizes that sum past 2^64 (found by FuzzOptions: the sum trapped).
                              ("4T,16777215T,4T", "48-bit")] {
            do {
                _ = try RAMLayout(parsing: text)
                Issue.record("'\(text)' was accepted")
            } catch {
                #expect(error.description.contains(words), "'\(text)': \(error)")
            }
        }
    }

    @Test func ramPagesNumberTheSlotsInOrder() throws {
        let ram = try GuestRAM(layout: RAMLayout(parsing: "4M,2M@1G,8M@6G"), backing: .pages4K)
        #expect(ram.pages == 14 * 256)
        #expect(ram.firstPage == [0, 1024, 1536])
        #expect(ram.slot(ofPage: 1023) == 0 && ram.slot(ofPage: 1024) == 1 && ram.slot(ofPage: 1536) == 2)
        #expect(ram.pointer(page: 1537) == ram.slots[2].pointer + 4096)
        #expect(ram.words(ofSlot: 1) == 16..<24)
        #expect(ram.pointer(linear: (6 << 20) + 12) == ram.slots[2].pointer + 12)

        // A bitmap from page 960 over 10 words: the last word of slot 0, all of slot 1, the first word of slot 2.
        var parts: [(Int, UInt64, [UInt64])] = []
        ram.forEachSlot(firstPage: 960, bitmap: (0..<10).map { UInt64($0) }) { parts.append(($0, $1, $2)) }
        #expect(parts.count == 3)
        #expect(parts[0].0 == 0 && parts[0].1 == 960 && parts[0].2 == [0])
        #expect(parts[1].0 == 1 && parts[1].1 == 0 && parts[1].2 == Array(1...8))
        #expect(parts[2].0 == 2 && parts[2].1 == 0 && parts[2].2 == [9])
    }
}
