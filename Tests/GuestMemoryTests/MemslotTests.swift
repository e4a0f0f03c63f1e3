import Testing
@testable import GuestMemory

@Suite struct AddressTests {
    @Test func typedArithmetic() {
        let g = GPA(0x20_1234)
        #expect(g.gfn == GFN(0x201))
        #expect(g.pageOffset == 0x234)
        #expect(g.alignedDown(to: PageSize.bytes2M) == GPA(0x20_0000))
        #expect(GFN(3).gpa == GPA(0x3000))
        #expect(GPA(0x5000) - GPA(0x1000) == 0x4000)
        #expect(PageSize.size2M.level == 2 && PageSize.size1G.bytes == 1 << 30)
    }

    @Test func byteCounts() {
        #expect(parseByteCount("4096") == 4096)
        #expect(parseByteCount("2M") == 2 << 20)
        #expect(parseByteCount("1GiB") == 1 << 30)
        #expect(parseByteCount("12kb") == 12 << 10)
        #expect(parseByteCount("x1G") == nil)
        #expect(parseByteCount("99999999999999999999T") == nil)
        #expect(formatBytes(3 << 29) == "1.5 GiB")
    }
}

@Suite struct MemslotTableTests {
    let mem: HostMemory

    init() throws { mem = try HostMemory(size: 16 << 20, backing: .pages4K) }

    @Test func rejectsBadSlots() throws {
        var t = MemslotTable(ipaBits: 39, maxSlots: 3)
        try t.add(id: 0, gpa: GPA(0x10_0000), size: 1 << 20, memory: mem)
        #expect(throws: GuestMemoryError.zeroSize) { try t.add(id: 1, gpa: GPA(0), size: 0, memory: mem) }
        #expect(throws: GuestMemoryError.unalignedGPA(GPA(0x1001), alignment: 4096)) {
            try t.add(id: 1, gpa: GPA(0x1001), size: 4096, memory: mem)
        }
        #expect(throws: GuestMemoryError.unalignedSize(4097, alignment: 4096)) {
            try t.add(id: 1, gpa: GPA(0x1000), size: 4097, memory: mem)
        }
        let high = GPA((1 << 39) - 4096)
        #expect(throws: GuestMemoryError.beyondIPA(GPARange(start: high, size: 8192), ipaBits: 39)) {
            try t.add(id: 1, gpa: high, size: 8192, memory: mem)
        }
        #expect(throws: GuestMemoryError.overlap(GPARange(start: GPA(0x18_0000), size: 1 << 20), slot: 0,
                                                  existing: GPARange(start: GPA(0x10_0000), size: 1 << 20))) {
            try t.add(id: 1, gpa: GPA(0x18_0000), size: 1 << 20, memory: mem)
        }
        #expect(throws: GuestMemoryError.duplicateSlot(0)) { try t.add(id: 0, gpa: GPA(0), size: 4096, memory: mem) }
        #expect(throws: GuestMemoryError.backingTooSmall(slotSize: 32 << 20, backingSize: 16 << 20)) {
            try t.add(id: 1, gpa: GPA(1 << 30), size: 32 << 20, memory: mem)
        }
        try t.add(id: 1, gpa: GPA(0), size: 4096, memory: mem)
        try t.add(id: 2, gpa: GPA(0x1000), size: 4096, memory: mem, memoryOffset: 4096)
        #expect(throws: GuestMemoryError.tooManySlots(limit: 3)) { try t.add(id: 3, gpa: GPA(1 << 30), size: 4096, memory: mem) }
        #expect(throws: GuestMemoryError.noSuchSlot(9)) { try t.delete(id: 9) }
        #expect(throws: GuestMemoryError.noSuchSlot(9)) { try t.move(id: 9, to: GPA(0)) }
        // Every error says what to do.
        #expect(GuestMemoryError.overlap(GPARange(start: GPA(0), size: 4096), slot: 0, existing: GPARange(start: GPA(0), size: 4096))
            .description.contains("delete slot 0"))
    }

    @Test func lookupMatchesLinearScan() throws {
        var t = MemslotTable(maxSlots: 512)
        var starts: [UInt64] = []
        for i in 0..<300 {
            let gpa = UInt64(i) * (3 << 20) + UInt64(i % 7) * 4096
            try t.add(id: i, gpa: GPA(gpa), size: 1 << 20, memory: mem)
            starts.append(gpa)
        }
        var x: UInt64 = 12345
        for _ in 0..<20_000 {
            x = x &* 6364136223846793005 &+ 1442695040888963407
            let gpa = GPA((x >> 20) % (300 * (3 << 20)))
            let expected = t.slots.first { $0.gpaRange.contains(gpa) }
            #expect(t.lookup(gpa) == expected)
        }
        #expect(t.lookup(GPA(1 << 40)) == nil)
    }

    @Test func moveAndFlags() throws {
        var t = MemslotTable()
        try t.add(id: 0, gpa: GPA(0), size: 1 << 20, memory: mem)
        try t.add(id: 1, gpa: GPA(4 << 20), size: 1 << 20, memory: mem, memoryOffset: 1 << 20)
        #expect(throws: GuestMemoryError.self) { try t.move(id: 0, to: GPA(4 << 20)) }
        let old = try t.move(id: 0, to: GPA(8 << 20))
        #expect(old.gpaRange.start == GPA(0))
        #expect(t.lookup(GPA(0)) == nil)
        #expect(t.lookup(GPA(8 << 20))?.id == 0)
        #expect(t.lookup(GPA(8 << 20))?.hva(for: GPA(8 << 20)) == mem.base)
        #expect(t.slots.map(\.id) == [1, 0])
        try t.setFlags(id: 1, [.readOnly, .dirtyLogging])
        #expect(t.slot(id: 1)?.flags == [.readOnly, .dirtyLogging])
        try t.delete(id: 1)
        #expect(t.memory(forSlot: 1) == nil && t.slots.count == 1)
    }

    @Test func slotsOverlappingHostRange() throws {
        var t = MemslotTable()
        try t.add(id: 0, gpa: GPA(1 << 30), size: 8 << 20, memory: mem)
        let hits = t.slots(overlapping: HVARange(start: mem.base + (4 << 20), size: 8 << 20))
        #expect(hits.count == 1)
        #expect(hits[0].gpa == GPARange(start: GPA((1 << 30) + (4 << 20)), size: 4 << 20))
    }
}
