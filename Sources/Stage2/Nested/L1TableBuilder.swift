import Glibc
import GuestMemory

/// Builds an L1 guest's stage-2 table for a nested guest inside L1 memory, as L1's own hypervisor
/// would: same descriptor format, outputs are L1 GPAs. `memory` is L1's RAM, mapped at L1 GPA 0;
/// table pages are taken from `tablesAt` upward.
public final class L1TableBuilder {
    public let memory: HostMemory
    public let root: GPA
    private var next: UInt64

    public init(memory: HostMemory, tablesAt: GPA) {
        self.memory = memory
        root = tablesAt
        next = tablesAt.raw + 4096
        memset(memory.pointer + Int(tablesAt.raw), 0, 4096)
    }

    private func entry(_ table: GPA, _ i: Int) -> UnsafeMutablePointer<UInt64> {
        (memory.pointer + Int(table.raw) + i * 8).assumingMemoryBound(to: UInt64.self)
    }

    /// Maps L2 [l2, l2 + size) to L1 GPA `l1` with one leaf of `size`.
    public func map(l2: GPA, to l1: GPA, size: PageSize = .size4K, permissions: Permissions = .all) {
        var table = root
        for level in 0..<size.level {
            let e = entry(table, Stage2Geometry.index(l2.raw, level))
            let d = Descriptor(raw: e.pointee)
            if d.isTable(level: level) {
                table = GPA(d.output.raw)
            } else {
                let t = GPA(next)
                next += 4096
                memset(memory.pointer + Int(t.raw), 0, 4096)
                e.pointee = t.raw | Descriptor.valid | Descriptor.tableOrPage
                table = t
            }
        }
        entry(table, Stage2Geometry.index(l2.raw, size.level)).pointee =
            Descriptor.leaf(HVA(l1.raw), level: size.level, attributes: permissions.rawValue | Descriptor.accessFlag).raw
    }

    /// Removes the leaf of `size` mapping `l2` (L1 must then ask for an invalidation).
    public func unmap(l2: GPA, size: PageSize = .size4K) {
        var table = root
        for level in 0..<size.level {
            let d = Descriptor(raw: entry(table, Stage2Geometry.index(l2.raw, level)).pointee)
            guard d.isTable(level: level) else { return }
            table = GPA(d.output.raw)
        }
        entry(table, Stage2Geometry.index(l2.raw, size.level)).pointee = 0
    }
}
