import Testing
@testable import GuestMemory
@testable import Stage2

@Suite struct SoftTLBTests {
    @Test func lookupChecksTagAndPermissions() {
        let tlb = SoftTLB()
        let host = HVA(0x7000_0000_0000)
        tlb.insert(GFN(5), host: host, permissions: [.read, .execute])
        #expect(tlb.lookup(GPA(0x5123), Descriptor.read) == (host + 0x123).pointer)
        #expect(tlb.lookup(GPA(0x5123), Descriptor.write) == nil)
        #expect(tlb.lookup(GPA(0x5123), SoftTLB.bits(.execute)) != nil)
        // Same index, other frame: a miss.
        #expect(tlb.lookup(GFN(5 + UInt64(SoftTLB.entryCount)).gpa, Descriptor.read) == nil)
    }

    @Test func rangedFlushDropsFramesAndBlocksItOverlaps() {
        let tlb = SoftTLB()
        let host = HVA(0x7000_0000_0000)
        tlb.insert(GFN(1), host: host, permissions: .all)
        tlb.insert(GFN(600), host: host, permissions: .all)
        tlb.insertBlock(GPA(0x40_0000), host: host, permissions: .all)      // region 2
        tlb.insertBlock(GPA(0x60_0000), host: host + (2 << 20), permissions: .all)  // region 3
        #expect(tlb.lookupBlock(GPA(0x60_0010), Descriptor.write) == (host + (2 << 20) + 0x10).pointer)
        // One 4K page inside region 2 and frame 1.
        tlb.flush(gfnStart: 1, gfnEnd: 2)
        tlb.flush(gfnStart: 0x401, gfnEnd: 0x402)
        #expect(tlb.lookup(GPA(0x1000), Descriptor.read) == nil)
        #expect(tlb.lookup(GPA(600 << 12), Descriptor.read) != nil)
        #expect(tlb.lookupBlock(GPA(0x40_0000), Descriptor.read) == nil)
        #expect(tlb.lookupBlock(GPA(0x60_0000), Descriptor.read) != nil)
        // A large range sweeps both arrays but keeps what lies outside it.
        tlb.flush(gfnStart: 0, gfnEnd: 0x500)
        #expect(tlb.lookup(GPA(600 << 12), Descriptor.read) == nil)
        #expect(tlb.lookupBlock(GPA(0x60_0000), Descriptor.read) != nil)
        #expect(tlb.entriesDropped == 3)
    }

    @Test func shootdownSkipsAVCPUOutsideGuestModeUntilItEnters() {
        let tlbs = TLBDomain()
        let tlb = SoftTLB()
        tlbs.register(tlb)
        tlb.insert(GFN(7), host: HVA(0x7000_0000_0000), permissions: .all)
        // Outside guest mode: the shootdown returns at once, the flush waits in the mailbox...
        tlbs.shootdown(GPARange(start: GPA(0x7000), size: 4096))
        #expect(tlb.flushes == 0)
        // ...and is applied before the vCPU can use the entry again.
        tlb.enterGuest()
        #expect(tlb.lookup(GPA(0x7000), Descriptor.read) == nil)
        tlb.exitGuest()
        tlbs.unregister(tlb)
    }
}
