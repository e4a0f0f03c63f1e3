import Foundation
import GuestMemory

/// Which pages a workload touches.
public enum AccessPattern: Sendable, Equatable, CustomStringConvertible {
    /// Every byte of the working set in order, `accessSize` at a time, wrapping around.
    case sequential
    /// Pages chosen uniformly at random.
    case uniform
    /// Page k (0-based) chosen with probability proportional to 1/(k+1)^theta: page 0 is hottest.
    case zipfian(theta: Double)
    /// A hot prefix of `hotFraction` of the pages receives `hotProbability` of the accesses.
    case hotCold(hotFraction: Double, hotProbability: Double)
    /// Every page in order, pass after pass: each access reads the vCPU's own 8-byte counter in the
    /// page (word `vcpu`), checks it holds the number of passes made so far, and stores that plus one,
    /// as QEMU's migration test guest does. A page that lost a write (a dirty page a migration
    /// dropped) shows as a mismatch. Writes ignore `write` and `size`; memory must start zeroed.
    case counter

    public var description: String {
        switch self {
        case .sequential: return "sequential"
        case .uniform: return "uniform"
        case let .zipfian(t): return "zipf:\(t)"
        case let .hotCold(f, p): return "hotcold:\(f):\(p)"
        case .counter: return "counter"
        }
    }
}

/// When a workload ends.
public enum WorkloadStop: Sendable, Equatable, CustomStringConvertible {
    /// After this many accesses per vCPU.
    case count(UInt64)
    /// After this many seconds.
    case duration(Double)

    /// The longest run, about 31 years.
    public static let maxDuration = 1e9

    public var description: String {
        switch self {
        case let .count(n): return "count=\(n)"
        case let .duration(s): return "duration=\(s)s"
        }
    }
}

/// A workload: the same spec and generator drive the soft backend's vCPUs and the KVM guest program.
public struct WorkloadSpec: Sendable, Equatable, CustomStringConvertible {
    public var pattern: AccessPattern
    /// First guest-physical address of the working set.
    public var base: GPA
    /// Bytes of guest memory the workload touches.
    public var workingSet: UInt64
    /// Fraction of accesses that are writes, 0...1.
    public var writeFraction: Double
    /// Bytes per access: 1, 2, 4 or 8.
    public var accessSize: Int
    /// Accesses per second per vCPU, or nil for as fast as possible.
    public var rate: UInt64?
    public var seed: UInt64
    public var stop: WorkloadStop

    public init(pattern: AccessPattern = .uniform, base: GPA = GPA(0), workingSet: UInt64 = 64 << 20,
                writeFraction: Double = 0.5, accessSize: Int = 8, rate: UInt64? = nil, seed: UInt64 = 1,
                stop: WorkloadStop = .count(1_000_000)) {
        self.pattern = pattern
        self.base = base
        self.workingSet = workingSet
        self.writeFraction = writeFraction
        self.accessSize = accessSize
        self.rate = rate
        self.seed = seed
        self.stop = stop
    }

    public var pages: UInt64 { workingSet >> PageSize.shift4K }

    /// Checks the spec; returns what is wrong, or nil.
    public func problem() -> String? {
        if workingSet < PageSize.bytes4K || workingSet % PageSize.bytes4K != 0 {
            return "working set must be a positive multiple of 4 KiB (got \(workingSet) bytes)"
        }
        if !base.isAligned(to: PageSize.bytes4K) { return "working-set base \(base) must be 4 KiB aligned" }
        if !(0...1).contains(writeFraction) { return "write fraction must be between 0 and 1 (got \(writeFraction))" }
        if ![1, 2, 4, 8].contains(accessSize) { return "access size must be 1, 2, 4 or 8 bytes (got \(accessSize))" }
        if pages > UInt64(UInt32.max) { return "working set too large (at most 16 TiB)" }
        switch pattern {
        case let .zipfian(t) where !(t > 0 && t < 10):
            return "zipf theta must be in (0, 10) (got \(t))"
        case let .hotCold(f, p) where !(f > 0 && f < 1 && p >= 0 && p <= 1):
            return "hot/cold needs 0 < hot fraction < 1 and 0 <= hot probability <= 1"
        default: break
        }
        switch stop {
        case .count(0): return "count must be positive"
        case let .duration(s) where !(s > 0): return "duration must be positive"
        // Deadlines are nanosecond counts: a longer run would overflow them.
        case let .duration(s) where !(s <= WorkloadStop.maxDuration): return "duration must be at most \(Int(WorkloadStop.maxDuration)) s"
        default: break
        }
        return nil
    }

    public var description: String {
        var s = "pattern=\(pattern),base=0x\(String(base.raw, radix: 16)),ws=\(exactByteCount(workingSet)),write=\(writeFraction),size=\(accessSize),seed=\(seed),\(stop)"
        if let rate { s += ",rate=\(rate)" }
        return s
    }

    /// Parses `key=value` pairs separated by commas, e.g.
    /// `pattern=zipf:0.99,ws=256M,write=0.3,size=8,seed=7,count=1000000` or `...,duration=2s`.
    /// Keys: pattern (sequential|uniform|zipf[:theta]|hotcold[:fraction[:probability]]|counter), base, ws, write,
    /// size, rate, seed, count, duration. Unspecified keys keep the defaults.
    public static func parse(_ text: String, defaults: WorkloadSpec = WorkloadSpec()) throws(WorkloadError) -> WorkloadSpec {
        var spec = defaults
        for item in text.split(separator: ",") where !item.isEmpty {
            let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { throw .badItem(String(item), reason: "expected key=value") }
            let (key, value) = (kv[0].lowercased(), kv[1])
            switch key {
            case "pattern":
                let parts = value.lowercased().split(separator: ":").map(String.init)
                let nums = parts.dropFirst().map { Double($0) }
                if nums.contains(where: { $0 == nil }) { throw .badItem(String(item), reason: "pattern parameters must be numbers") }
                let p = nums.compactMap { $0 }
                switch parts.first ?? "" {
                case "sequential", "seq": spec.pattern = .sequential
                case "uniform", "random": spec.pattern = .uniform
                case "zipf", "zipfian": spec.pattern = .zipfian(theta: p.first ?? 0.99)
                case "hotcold", "hot-cold": spec.pattern = .hotCold(hotFraction: p.first ?? 0.1, hotProbability: p.count > 1 ? p[1] : 0.9)
                case "counter": spec.pattern = .counter
                default: throw .badItem(String(item), reason: "pattern is one of sequential, uniform, zipf[:theta], hotcold[:fraction[:probability]], counter")
                }
            case "base":
                let v = value.lowercased().hasPrefix("0x") ? UInt64(value.dropFirst(2), radix: 16) : parseByteCount(value)
                guard let v else { throw .badItem(String(item), reason: "base is an address like 0x100000 or 1G") }
                spec.base = GPA(v)
            case "ws", "working-set", "workingset":
                guard let v = parseByteCount(value) else { throw .badItem(String(item), reason: "working set is a size like 64M") }
                spec.workingSet = v
            case "write", "writes":
                guard let v = Double(value) else { throw .badItem(String(item), reason: "write fraction is a number in 0...1") }
                spec.writeFraction = v
            case "size", "access-size":
                guard let v = Int(value) else { throw .badItem(String(item), reason: "access size is 1, 2, 4 or 8") }
                spec.accessSize = v
            case "rate":
                guard let v = UInt64(value), v > 0 else { throw .badItem(String(item), reason: "rate is accesses per second, a positive integer") }
                spec.rate = v
            case "seed":
                guard let v = UInt64(value) else { throw .badItem(String(item), reason: "seed is an unsigned integer") }
                spec.seed = v
            case "count":
                guard let v = UInt64(value) else { throw .badItem(String(item), reason: "count is a positive integer") }
                spec.stop = .count(v)
            case "duration":
                guard let v = parseDuration(value) else { throw .badItem(String(item), reason: "duration is like 2s, 500ms or 1.5") }
                spec.stop = .duration(v)
            default:
                throw .badItem(String(item), reason: "unknown key \(key); keys are pattern, base, ws, write, size, rate, seed, count, duration")
            }
        }
        if let p = spec.problem() { throw .invalid(p) }
        return spec
    }
}

/// Parses "2s", "500ms", "1.5" (seconds).
public func parseDuration(_ text: String) -> Double? {
    let t = text.lowercased()
    if t.hasSuffix("ms"), let v = Double(t.dropLast(2)) { return v / 1000 }
    if t.hasSuffix("s"), let v = Double(t.dropLast()) { return v }
    return Double(t)
}

public enum WorkloadError: Error, Equatable, CustomStringConvertible {
    case badItem(String, reason: String)
    case invalid(String)
    public var description: String {
        switch self {
        case let .badItem(item, reason): return "workload spec item '\(item)': \(reason)"
        case let .invalid(why): return "workload spec: \(why)"
        }
    }
}
