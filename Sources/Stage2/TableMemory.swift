import Glibc
import GuestMemory
import HostSystem
import Synchronization

/// A 4 KiB stage-2 table: 512 descriptors, each updated atomically in place.
@frozen
public struct DescriptorTable: Hashable, @unchecked Sendable {   // points at atomics: every access to a descriptor is atomic
    public static let entries = 512
    public static let bytes = 4096

    public let base: UnsafeMutablePointer<Atomic<UInt64>>

    @inlinable @inline(__always) public init(_ raw: UnsafeMutableRawPointer) {
        base = raw.assumingMemoryBound(to: Atomic<UInt64>.self)
    }
    /// The table at `address` (the table pool keeps tables by address).
    @inlinable @inline(__always) public init(address: UInt) { self.init(UnsafeMutableRawPointer(bitPattern: address)!) }
    @inlinable @inline(__always) public var raw: UnsafeMutableRawPointer { UnsafeMutableRawPointer(base) }

    @inlinable @inline(__always) public func entry(_ i: Int) -> DescriptorPointer { DescriptorPointer(base + i) }
    @inlinable @inline(__always) public func load(_ i: Int) -> Descriptor {
        Descriptor(raw: base[i].load(ordering: .acquiring))
    }

    /// True when no entry is valid or locked (the table can be freed).
    public var isEmpty: Bool {
        for i in 0..<Self.entries where base[i].load(ordering: .relaxed) != 0 { return false }
        return true
    }

    public static func == (a: DescriptorTable, b: DescriptorTable) -> Bool { a.base == b.base }
    public func hash(into h: inout Hasher) { h.combine(base) }
}

/// The address of one descriptor. Every update is atomic; shared walks only ever compare-and-swap.
@frozen
public struct DescriptorPointer: @unchecked Sendable {   // points at an atomic descriptor
    public let base: UnsafeMutablePointer<Atomic<UInt64>>
    @inlinable @inline(__always) public init(_ p: UnsafeMutablePointer<Atomic<UInt64>>) { base = p }

    @inlinable @inline(__always) public func load() -> Descriptor {
        Descriptor(raw: base.pointee.load(ordering: .acquiring))
    }
    @inlinable @inline(__always) public func store(_ d: Descriptor) {
        base.pointee.store(d.raw, ordering: .releasing)
    }
    /// Replaces `expected` with `desired`; false if the entry changed meanwhile (a lost race).
    @inlinable @inline(__always) public func compareExchange(_ expected: Descriptor, _ desired: Descriptor) -> Bool {
        base.pointee.compareExchange(expected: expected.raw, desired: desired.raw,
                                     ordering: .acquiringAndReleasing).exchanged
    }
    /// Atomically replaces the entry; returns what it held (a racing vCPU update is not lost).
    @inlinable @inline(__always) public func exchange(_ d: Descriptor) -> Descriptor {
        Descriptor(raw: base.pointee.exchange(d.raw, ordering: .acquiringAndReleasing))
    }
    /// Atomically ORs bits in; returns the previous value.
    @inlinable @inline(__always) public func setBits(_ bits: UInt64) -> Descriptor {
        Descriptor(raw: base.pointee.bitwiseOr(bits, ordering: .acquiringAndReleasing).oldValue)
    }
}

/// Process-wide pool of zeroed 4 KiB table pages, carved from 2 MiB mmap chunks.
/// Freed tables are zeroed by the freeing thread, so allocation is a pop.
public final class TableAllocator: Sendable {
    /// Free tables by address: addresses are Sendable, so they pass the lock without copying.
    private struct Pool {
        var free: [UInt] = []
        var chunks: [Chunk] = []
    }
    private let pool = Mutex(Pool())
    private let inUse = Atomic<Int>(0)
    static let chunkBytes = 2 << 20

    public init() {}

    /// Tables currently handed out.
    public var tablesInUse: Int { inUse.load(ordering: .relaxed) }
    public var bytesInUse: UInt64 { UInt64(tablesInUse * DescriptorTable.bytes) }

    /// Hands out `count` zeroed tables.
    public func allocate(_ count: Int, into out: inout [UInt]) {
        pool.withLock { p in
            while p.free.count < count { Self.grow(&p) }
            out.append(contentsOf: p.free.suffix(count))
            p.free.removeLast(count)
        }
        inUse.add(count, ordering: .relaxed)
    }

    public func allocate() -> DescriptorTable {
        var out: [UInt] = []
        allocate(1, into: &out)
        return DescriptorTable(address: out[0])
    }

    /// Returns tables to the pool. The caller guarantees no walker can still reach them.
    public func free(_ tables: [DescriptorTable]) {
        guard !tables.isEmpty else { return }
        for t in tables { memset(t.raw, 0, DescriptorTable.bytes) }
        pool.withLock { p in p.free.append(contentsOf: tables.map { UInt(bitPattern: $0.raw) }) }
        inUse.subtract(tables.count, ordering: .relaxed)
    }

    /// One 2 MiB mapping tables are carved from, unmapped with the pool.
    private final class Chunk: Sendable {
        let mapping: Mapping
        init() throws(SystemCallError) { mapping = try Mapping(size: TableAllocator.chunkBytes, flags: MAP_PRIVATE | MAP_ANONYMOUS, what: "2 MiB of stage-2 tables") }
    }

    private static func grow(_ p: inout Pool) {
        let chunk: Chunk
        do { chunk = try Chunk() } catch {
            fatalError("stage-2 table memory: \(error); the host is out of memory")
        }
        let c = chunk.mapping.base
        _ = c.bindMemory(to: Atomic<UInt64>.self, capacity: chunkBytes / 8)
        p.chunks.append(chunk)
        for i in stride(from: chunkBytes - DescriptorTable.bytes, through: 0, by: -DescriptorTable.bytes) {
            p.free.append(UInt(bitPattern: c + i))
        }
    }
}

/// A per-thread reserve of tables, topped up before a walk takes the MMU lock (KVM's memory cache),
/// so map and split never allocate under the lock. Falls back to the allocator if it runs dry.
public struct TableCache {
    public let allocator: TableAllocator
    private var tables: [UInt] = []
    /// Tables taken from the cache (split and map memory), for reporting.
    public private(set) var used = 0

    public init(allocator: TableAllocator) {
        self.allocator = allocator
        tables.reserveCapacity(64)
    }

    public mutating func topUp(to n: Int) {
        if tables.count < n { allocator.allocate(n - tables.count, into: &tables) }
    }

    @inline(__always)
    public mutating func take() -> DescriptorTable {
        if tables.isEmpty { allocator.allocate(4, into: &tables) }
        used += 1
        return DescriptorTable(address: tables.removeLast())
    }

    /// Puts back a table the walk took but did not install.
    public mutating func giveBack(_ t: DescriptorTable) {
        used -= 1
        tables.append(UInt(bitPattern: t.raw))
    }

    /// Returns every cached table to the allocator.
    public mutating func drain() {
        allocator.free(tables.map { DescriptorTable(address: $0) })
        tables.removeAll(keepingCapacity: true)
    }
}
