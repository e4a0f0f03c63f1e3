import Foundation
import ArgumentParser
import GuestMemory
import KVMBackend
import Control
import Migration
import VirtualMachine
import Workload

extension Backing: ExpressibleByArgument {}
extension BackendKind: ExpressibleByArgument {}
extension Convergence: ExpressibleByArgument {}

/// The guest every running command builds: backend, memory, its backing, vCPUs.
struct GuestOptions: ParsableArguments {
    @Option(help: "Backend: soft (our MMU and software vCPUs) or kvm (/dev/kvm, the guest program at CPL3).")
    var backend: BackendKind = .soft
    @Option(help: ArgumentHelp("Guest memory: a size (256M, 1G), or memslots SIZE[@GPA],... (1G,6G@4G).",
                               discussion: "Several slots: each size and address a multiple of 2 MiB; a slot without an address follows the one before. The workload's addresses run across the slots in order."),
            transform: { try LayoutArgument.parse($0) })
    var memory = LayoutArgument(RAMLayout(size: 512 << 20))
    @Option(help: "Host backing: 4k, thp, hugetlb, hugetlb1g, memfd.")
    var backing: Backing = .thp
    @Option(help: "Number of vCPUs (1-64).")
    var vcpus: Int = 2

    func validate() throws {
        guard (1...64).contains(vcpus) else { throw ValidationError("--vcpus must be 1...64") }
        if backend == .kvm && vcpus > X86Layout.maxVCPUs { throw ValidationError("the kvm backend runs at most \(X86Layout.maxVCPUs) vCPUs") }
        if backend == .kvm && memory.layout.regions[0].size <= X86Layout.reservedEnd.raw {
            throw ValidationError("--memory: the first slot must exceed 1 MiB on the kvm backend")
        }
    }

    func makeVM() throws -> any VirtualMachine {
        try makeVirtualMachine(VMConfig(backend: backend, layout: memory.layout, backing: backing, vcpus: vcpus))
    }

    /// Parses a workload spec for this guest; the working set defaults to all memory above the base.
    func workload(_ text: String) throws -> WorkloadSpec {
        let base = backend.workloadBase
        let size = memory.layout.size
        let spec = try parseWorkload(text, memory: size, defaults: WorkloadSpec(base: base, workingSet: size - base.raw))
        guard spec.base >= base else {
            throw ValidationError("on the \(backend) backend the working set starts at \(base) or above (the guest program's pages lie below)")
        }
        return spec
    }
}

/// A size like 1G, 256M, 4096.
struct ByteSize: ExpressibleByArgument, CustomStringConvertible {
    let bytes: UInt64
    init?(argument: String) {
        guard let b = parseByteCount(argument), b > 0 else { return nil }
        bytes = b
    }
    var description: String { formatBytes(bytes) }
}

/// A memory layout: a size, or slots like 1G,6G@4G.
struct LayoutArgument: CustomStringConvertible {
    let layout: RAMLayout
    init(_ layout: RAMLayout) { self.layout = layout }
    /// Keeps RAMLayout's own message (what was wrong) for a bad value.
    static func parse(_ text: String) throws -> LayoutArgument {
        do { return LayoutArgument(try RAMLayout(parsing: text)) } catch { throw ValidationError("--memory \(text): \(error)") }
    }
    var description: String { layout.description }
    var defaultValueDescription: String { layout.argument }
}

/// A duration like 2s, 500ms.
struct Seconds: ExpressibleByArgument, CustomStringConvertible {
    let value: Double
    init?(argument: String) {
        guard let v = parseDuration(argument), v > 0 else { return nil }
        value = v
    }
    var description: String { value < 1 ? "\(Int((value * 1000).rounded()))ms" : "\(value)s" }
    var defaultValueDescription: String { description }
}

/// Formats a rate or count compactly: 1234567 -> "1.23M".
func compact(_ v: Double) -> String {
    switch v {
    case 1e9...: return String(format: "%.2fG", v / 1e9)
    case 1e6...: return String(format: "%.2fM", v / 1e6)
    case 1e3...: return String(format: "%.1fk", v / 1e3)
    default: return String(format: "%.0f", v)
    }
}

/// One JSON object on one line, keys in the order given.
/// Where a command's text goes: human text to stdout, or to stderr once the command was asked for
/// --json, so that stdout then holds JSON lines only.
enum Output {
    nonisolated(unsafe) static var json = false
}

/// Human text: stdout, or stderr under --json.
func say(_ text: String = "", terminator: String = "\n") {
    if Output.json { FileHandle.standardError.write(Data((text + terminator).utf8)) } else { print(text, terminator: terminator) }
}

/// A JSON line: stdout, always.
func printJSON(_ line: String) { print(line) }

/// One JSON object on a line. A command's line (its first field `command`) always says how it ended:
/// `status` is `completed` unless the fields say otherwise.
func jsonLine(_ fields: [(String, Any)]) -> String {
    var fields = fields
    if fields.first?.0 == "command", !fields.contains(where: { $0.0 == "status" }) { fields.insert(("status", "completed"), at: 1) }
    func encode(_ v: Any) -> String {
        switch v {
        case let s as String: return JSON.string(s).description
        case let d as Double: return d.isFinite ? String(format: "%.3f", d) : "null"
        case let b as Bool: return b ? "true" : "false"
        case let i as Int: return String(i)
        case let u as UInt64: return String(u)
        case let a as [Any]: return "[" + a.map(encode).joined(separator: ",") + "]"
        case let o as [(String, Any)]: return jsonLine(o)
        default: return "\"\(v)\""
        }
    }
    return "{" + fields.map { "\"\($0.0)\":" + encode($0.1) }.joined(separator: ",") + "}"
}
