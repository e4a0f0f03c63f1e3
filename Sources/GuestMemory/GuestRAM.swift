/// Where a guest's RAM lies: one or more memslots in ascending GPA order, the first at GPA 0.
///
/// Two numberings run across the slots, slot 0's bytes first, then slot 1's, and so on:
/// - the **RAM page** index, which dirty bitmaps, migration streams and snapshots use;
/// - the **linear address**, which workloads use: the guest maps linear address x to the RAM byte x
///   (the KVM guest program's page tables, the soft vCPU's `gpa(linear:)`), so a working set may
///   span slots and the holes between them. With one slot at 0, linear addresses are GPAs.
///
/// With several slots every size and address is a multiple of 2 MiB, so each slot's pages start on a
/// bitmap word (512 pages) and its linear range maps with 2 MiB guest pages.
public struct RAMLayout: Equatable, Sendable, CustomStringConvertible {
    public struct Region: Equatable, Sendable {
        public var gpa: GPA
        public var size: UInt64
        public init(gpa: GPA, size: UInt64) { self.gpa = gpa; self.size = size }
        public var end: UInt64 { gpa.raw + size }
    }

    public static let maxRegions = 32
    public let regions: [Region]
    /// Sum of the sizes: the linear address space.
    public let size: UInt64
    /// Slot 0's size: linear addresses below it are their own GPA (the fast path).
    @usableFromInline let firstSize: UInt64

    /// Linear addresses are GPAs, without bound (a guest with no layout of its own).
    public static let identity = RAMLayout(size: .max)

    /// One slot of `size` bytes at GPA 0.
    public init(size: UInt64) {
        regions = [Region(gpa: GPA(0), size: size)]
        self.size = size
        firstSize = size
    }

    public init(_ regions: [Region]) throws(GuestMemoryError) {
        guard let first = regions.first else { throw .badLayout("no memory slots: give at least one size") }
        guard first.gpa.raw == 0 else { throw .badLayout("the first slot must start at GPA 0 (the guest's low memory)") }
        guard regions.count <= Self.maxRegions else { throw .badLayout("\(regions.count) slots; at most \(Self.maxRegions)") }
        var total: UInt64 = 0
        for (i, r) in regions.enumerated() {
            // Checked before anything adds them: a layout read from a peer may hold any values.
            guard r.gpa.raw <= 1 << 48, r.size <= (1 << 48) - r.gpa.raw else {
                throw .badLayout("slot \(i) (\(r.size) bytes at \(hex(r.gpa.raw))) ends beyond the 48-bit guest-physical space")
            }
            guard r.size > 0, r.size % PageSize.bytes4K == 0 else {
                throw .badLayout("slot \(i): size \(r.size) bytes is not a positive multiple of 4 KiB")
            }
            if regions.count > 1 {
                guard r.size % PageSize.bytes2M == 0, r.gpa.raw % PageSize.bytes2M == 0 else {
                    throw .badLayout("slot \(i) (\(formatBytes(r.size)) at \(hex(r.gpa.raw))): with several slots each size and address must be a multiple of 2 MiB")
                }
            }
            if i > 0 {
                guard r.gpa.raw >= regions[i - 1].end else {
                    throw .badLayout("slot \(i) at \(hex(r.gpa.raw)) overlaps or precedes slot \(i - 1), which ends at \(hex(regions[i - 1].end)): give slots in ascending address order")
                }
            }
            guard r.end <= 1 << 48 else { throw .badLayout("slot \(i) ends beyond the 48-bit guest-physical space") }
            total += r.size
        }
        self.regions = regions
        size = total
        firstSize = first.size
    }

    /// Parses `SIZE[@GPA],SIZE[@GPA]...` (e.g. `512M`, `1G,6G@4G`): a slot without an address starts
    /// where the previous one ends.
    public init(parsing text: String) throws(GuestMemoryError) {
        var regions: [Region] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let parts = item.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false)
            guard let size = parseByteCount(String(parts[0])), size > 0 else {
                throw .badLayout("'\(item)' is not a size like 512M or a slot like 6G@4G")
            }
            // Where the previous slot ends, checked: the sizes are the user's, and may sum past 2^64.
            var gpa: UInt64 = 0
            if let last = regions.last {
                let (end, overflow) = last.gpa.raw.addingReportingOverflow(last.size)
                guard !overflow else { throw .badLayout("'\(text)': the slots end beyond the 48-bit guest-physical space") }
                gpa = end
            }
            if parts.count == 2 {
                let t = parts[1].lowercased()
                guard let g = t.hasPrefix("0x") ? UInt64(t.dropFirst(2), radix: 16) : parseByteCount(String(t)) else {
                    throw .badLayout("'\(parts[1])' in '\(item)' is not an address like 4G or 0x100000000")
                }
                gpa = g
            }
            regions.append(Region(gpa: GPA(gpa), size: size))
        }
        try self.init(regions)
    }

    public var pages: UInt64 { size >> PageSize.shift4K }

    /// The GPA of linear address `linear` (below `size`).
    @inlinable @inline(__always)
    public func gpa(linear: UInt64) -> GPA {
        if linear < firstSize { return GPA(linear) }
        return gpaBeyondFirst(linear)
    }

    @usableFromInline func gpaBeyondFirst(_ linear: UInt64) -> GPA {
        var offset = linear
        for r in regions {
            if offset < r.size { return r.gpa + offset }
            offset -= r.size
        }
        return GPA(linear)   // beyond RAM: left as is, the guest faults there
    }

    /// `512 MiB` for one slot at 0, else `1 GiB@0x0 + 6 GiB@0x100000000`.
    public var description: String {
        if regions.count == 1 { return formatBytes(size) }
        return regions.map { "\(formatBytes($0.size))@\(hex($0.gpa.raw))" }.joined(separator: " + ")
    }

    /// The layout in the form `init(parsing:)` reads.
    public var argument: String {
        regions.map { r in r.gpa.raw == 0 ? exactByteCount(r.size) : "\(exactByteCount(r.size))@\(hex(r.gpa.raw))" }.joined(separator: ",")
    }
}

/// A guest's RAM: the host memory of each slot of a layout, and the RAM page numbering across them.
public struct GuestRAM: Sendable {
    public let layout: RAMLayout
    /// Slot i's host memory.
    public let slots: [HostMemory]
    /// Slot i's first RAM page.
    public let firstPage: [UInt64]
    public let pages: UInt64

    /// Maps every slot of `layout` with `backing`.
    public init(layout: RAMLayout, backing: Backing, alignment: UInt64 = 0) throws(GuestMemoryError) {
        var slots: [HostMemory] = []
        for r in layout.regions { slots.append(try HostMemory(size: r.size, backing: backing, alignment: alignment)) }
        self.init(layout: layout, slots: slots)
    }

    /// One slot at GPA 0.
    public init(_ memory: HostMemory) {
        self.init(layout: RAMLayout(size: memory.size), slots: [memory])
    }

    init(layout: RAMLayout, slots: [HostMemory]) {
        self.layout = layout
        self.slots = slots
        var first: [UInt64] = []
        var p: UInt64 = 0
        for r in layout.regions { first.append(p); p += r.size >> PageSize.shift4K }
        firstPage = first
        pages = p
    }

    public var size: UInt64 { layout.size }
    public var backing: Backing { slots[0].backing }

    /// The slot holding RAM page `page` (below `pages`).
    @inline(__always)
    public func slot(ofPage page: UInt64) -> Int {
        var s = slots.count - 1
        while firstPage[s] > page { s -= 1 }
        return s
    }

    /// The RAM pages of slot `s`.
    public func pages(ofSlot s: Int) -> Range<UInt64> { firstPage[s]..<(firstPage[s] + (slots[s].size >> PageSize.shift4K)) }

    /// The words of a RAM-wide dirty bitmap that hold slot `s`'s pages (slots start on a word).
    public func words(ofSlot s: Int) -> Range<Int> {
        let p = pages(ofSlot: s)
        return Int(p.lowerBound >> 6)..<Int((p.upperBound + 63) >> 6)
    }

    /// Words in a bitmap of every RAM page.
    public var bitmapWords: Int { Int((pages + 63) >> 6) }

    /// The host address of RAM page `page`.
    @inline(__always)
    public func pointer(page: UInt64) -> UnsafeMutableRawPointer { location(page: page).host }

    /// The host address of RAM page `page`, and the first RAM page beyond its slot (a run of pages
    /// from `page` is contiguous in host memory up to there).
    @inline(__always)
    public func location(page: UInt64) -> (host: UnsafeMutableRawPointer, slotEnd: UInt64) {
        let s = slot(ofPage: page)
        return (slots[s].pointer + Int((page - firstPage[s]) << PageSize.shift4K), pages(ofSlot: s).upperBound)
    }

    /// The host address of linear address `linear`.
    public func pointer(linear: UInt64) -> UnsafeMutableRawPointer {
        pointer(page: linear >> PageSize.shift4K) + Int(linear & (PageSize.bytes4K - 1))
    }

    /// Splits a RAM-wide bitmap whose first bit is RAM page `firstPage` (a multiple of 64) into the
    /// part of each slot it covers: `body(slot, first page within the slot, words)`.
    public func forEachSlot<E: Error>(firstPage: UInt64, bitmap: [UInt64],
                                      _ body: (Int, UInt64, [UInt64]) throws(E) -> Void) throws(E) {
        precondition(firstPage % 64 == 0, "a bitmap starts on a multiple of 64 pages")
        let first = Int(firstPage >> 6), end = first + bitmap.count
        for s in slots.indices {
            let w = words(ofSlot: s)
            let lo = max(w.lowerBound, first), hi = min(w.upperBound, end)
            guard lo < hi else { continue }
            try body(s, UInt64(lo - w.lowerBound) << 6, Array(bitmap[(lo - first)..<(hi - first)]))
        }
    }

    /// Touches every slot so the host allocates it now (MADV_POPULATE_WRITE).
    public func populate() throws(GuestMemoryError) {
        for m in slots { try m.populate() }
    }
}
