import Foundation
import Glibc
import HostSystem

/// Reads a /proc file. They report size 0, so read until EOF rather than trusting the size.
func readProcFile(_ path: String) -> String? {
    guard let file = try? FileDescriptor(opening: path, O_RDONLY) else { return nil }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        guard let n = try? system("read(\(path))", { chunk.withUnsafeMutableBytes { read(file.raw, $0.baseAddress, $0.count) } }), n > 0 else { break }
        bytes.append(contentsOf: chunk[0..<n])
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// How the kernel really backs a host mapping, read from /proc/self/smaps.
public struct BackingReport: Sendable, CustomStringConvertible {
    public var backing: Backing
    public var size: UInt64
    /// Resident bytes.
    public var rss: UInt64
    /// Resident bytes in transparent huge pages (AnonHugePages + ShmemPmdMapped + FilePmdMapped).
    public var hugeTransparent: UInt64
    /// Resident bytes in hugetlbfs pages (Private_Hugetlb + Shared_Hugetlb).
    public var hugetlb: UInt64
    /// The kernel's page size for the mapping (4 KiB, or the hugetlb page size).
    public var kernelPageSize: UInt64
    /// Whether the kernel considers the mapping eligible for THP.
    public var thpEligible: Bool

    /// Fraction of resident memory that sits in huge pages of either kind.
    public var hugeFraction: Double {
        rss == 0 ? 0 : Double(hugeTransparent + hugetlb) / Double(rss)
    }

    public var description: String {
        var s = "\(backing) \(formatBytes(size)): resident \(formatBytes(rss))"
        if hugetlb > 0 || kernelPageSize > PageSize.bytes4K {
            s += ", hugetlb \(formatBytes(hugetlb)) in \(formatBytes(kernelPageSize)) pages"
        } else {
            s += ", THP \(formatBytes(hugeTransparent)) (\(Int((hugeFraction * 100).rounded()))%)"
            s += thpEligible ? ", THP-eligible" : ", not THP-eligible"
        }
        return s
    }
}

extension HostMemory {
    /// Reads /proc/self/smaps and sums the counters of every mapping that overlaps this one.
    public func report() -> BackingReport {
        var r = BackingReport(backing: backing, size: size, rss: 0, hugeTransparent: 0, hugetlb: 0,
                              kernelPageSize: PageSize.bytes4K, thpEligible: false)
        guard let text = readProcFile("/proc/self/smaps") else { return r }
        var inside = false
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            if let dash = line.firstIndex(of: "-"), line.first?.isHexDigit == true,
               let space = line.firstIndex(of: " "), dash < space,
               let lo = UInt64(line[line.startIndex..<dash], radix: 16),
               let hi = UInt64(line[line.index(after: dash)..<space], radix: 16) {
                inside = HVARange(start: HVA(lo), end: HVA(hi)).overlaps(range)
                continue
            }
            guard inside, let colon = line.firstIndex(of: ":") else { continue }
            let key = line[line.startIndex..<colon]
            let fields = line[line.index(after: colon)...].split(separator: " ")
            guard let first = fields.first, let n = UInt64(first) else { continue }
            let bytes = n * 1024
            switch key {
            case "Rss": r.rss += bytes
            case "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped": r.hugeTransparent += bytes
            case "Private_Hugetlb", "Shared_Hugetlb": r.hugetlb += bytes
            case "KernelPageSize": r.kernelPageSize = max(r.kernelPageSize, bytes)
            case "THPeligible": r.thpEligible = r.thpEligible || n == 1
            default: break
            }
        }
        // For hugetlb mappings Rss stays 0; the hugetlb counters are the resident figure.
        r.rss = max(r.rss, r.hugetlb)
        return r
    }
}

extension GuestRAM {
    /// The reports of every slot, summed (the backing and page size are slot 0's).
    public func report() -> BackingReport {
        var r = slots[0].report()
        for m in slots.dropFirst() {
            let o = m.report()
            r.size += o.size
            r.rss += o.rss
            r.hugeTransparent += o.hugeTransparent
            r.hugetlb += o.hugetlb
        }
        return r
    }
}
