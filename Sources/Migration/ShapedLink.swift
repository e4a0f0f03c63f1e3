import CVMMSys
import Foundation
import Glibc

/// Two hosts on one machine: two network namespaces joined by a veth pair, each end's egress shaped
/// by tc's token bucket (tbf) to a rate, so a migration's source and destination talk over a real
/// kernel network path with a real bottleneck (`vmm bench migrate --link`, the link tests). The
/// process makes and removes everything itself (it must be root) and uses only addresses inside its
/// own namespaces. Latency and loss need tc's netem, which this host's kernel lacks: a link is a
/// rate only, and `ShapedLink.Shape` refuses a delay, saying so.
public final class ShapedLink: @unchecked Sendable {
    /// A link's shape: a rate as tc writes it (`100mbit`, `1gbit`, `10gbit`).
    public struct Shape: Sendable, CustomStringConvertible {
        public var rate: String
        /// Bits per second.
        public var bitsPerSecond: Double

        /// `RATE` (e.g. `1gbit`); `RATE,DELAY` is refused while netem is missing.
        public init(parsing text: String) throws {
            let parts = text.split(separator: ",").map(String.init)
            guard let first = parts.first, let bits = Self.bits(first) else {
                throw MigrationError(.badOption, "a link is a rate such as 100mbit, 1gbit or 10gbit, not \(text)")
            }
            guard parts.count == 1 else {
                throw MigrationError(.badOption, "a link's delay or loss (\(parts.dropFirst().joined(separator: ","))) needs tc's netem, "
                                     + "which this kernel lacks: give a rate only")
            }
            rate = first.lowercased()
            bitsPerSecond = bits
        }

        public var description: String { rate }

        private static func bits(_ s: String) -> Double? {
            let units: [(String, Double)] = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)]
            for (u, m) in units where s.lowercased().hasSuffix(u) {
                guard let v = Double(s.dropLast(u.count)), v > 0, v * m <= 1e11 else { return nil }
                return v * m
            }
            return nil
        }
    }

    public enum Side: Sendable { case source, destination }

    public let shape: Shape
    /// The destination end's address, inside its namespace.
    public let destinationHost: String
    private let names: (source: String, destination: String)

    /// Makes the namespaces and the link; `deinit` removes them.
    public init(_ shape: Shape) throws {
        self.shape = shape
        // Unique on this host (a full pid and a random part): a link never touches another's.
        let tag = "\(getpid())-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        names = ("vmm-\(tag)-src", "vmm-\(tag)-dst")
        // Each pair of namespaces is isolated: every link may use the same subnet.
        let subnet = "10.200.0"
        destinationHost = "\(subnet).2"
        // Made inside the new namespaces, the interfaces' names need not be unique either.
        let (a, b) = ("vmmsrc", "vmmdst")
        // A burst of 10 ms at the rate (at least 64 KiB), so the bucket neither starves a fast link
        // nor lets a slow one run far ahead of its rate.
        let burst = max(65_536, Int(shape.bitsPerSecond / 8 / 100))
        let steps: [[String]] = [
            ["netns", "add", names.source], ["netns", "add", names.destination],
            ["link", "add", a, "netns", names.source, "type", "veth", "peer", "name", b, "netns", names.destination],
            ["-n", names.source, "addr", "add", "\(subnet).1/24", "dev", a],
            ["-n", names.destination, "addr", "add", "\(subnet).2/24", "dev", b],
            ["-n", names.source, "link", "set", a, "up"], ["-n", names.destination, "link", "set", b, "up"],
            ["-n", names.source, "link", "set", "lo", "up"], ["-n", names.destination, "link", "set", "lo", "up"],
        ]
        do {
            for s in steps {
                try Self.run("ip", s)
                if s.count == 3 && s[0] == "netns" && s[1] == "add" { created.append(s[2]) }
            }
            for (ns, dev) in [(names.source, a), (names.destination, b)] {
                try Self.run("ip", ["netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", shape.rate,
                                    "burst", "\(burst)", "latency", "50ms"])
            }
        } catch {
            remove()
            throw error
        }
    }

    deinit { remove() }

    /// The namespaces this link made (only those are removed).
    private var created: [String] = []

    private func remove() {
        // The veth pair goes with its namespaces.
        for ns in created { try? Self.run("ip", ["netns", "del", ns]) }
        created = []
    }

    /// Runs `body` on this thread inside `side`'s namespace (sockets made there stay there), then
    /// puts the thread back.
    public func within<T>(_ side: Side, _ body: () throws -> T) throws -> T {
        let home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        guard home >= 0 else { throw MigrationError.connection("open /proc/thread-self/ns/net: \(String(cString: strerror(errno)))") }
        defer { close(home) }
        let name = side == .source ? names.source : names.destination
        let fd = open("/var/run/netns/\(name)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw MigrationError.connection("open /var/run/netns/\(name): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard cvmm_setns_net(fd) == 0 else {
            throw MigrationError.connection("setns into \(name): \(String(cString: strerror(errno))) (a shaped link needs root)")
        }
        defer { _ = cvmm_setns_net(home) }
        return try body()
    }

    /// Whether this host can make a link (root, `ip` and `tc` with tbf); why not, if it cannot.
    public static var unavailable: String? {
        do { _ = try ShapedLink(Shape(parsing: "1gbit")); return nil } catch { return "\(error)" }
    }

    private static func run(_ tool: String, _ arguments: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/\(tool)")
        p.arguments = arguments
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        do { try p.run() } catch {
            throw MigrationError.connection("\(tool) \(arguments.joined(separator: " ")): \(error) (a shaped link needs iproute2's \(tool))")
        }
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            let why = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            throw MigrationError.connection("\(tool) \(arguments.joined(separator: " ")) failed: \(why)")
        }
    }
}
