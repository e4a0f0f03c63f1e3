import CVMMSys
import Foundation
import Glibc
import HostSystem

/// Two hosts on one machine: two network namespaces joined by a link whose ends' egress is shaped by
/// tc's token bucket (tbf) to a rate, so a migration's source and destination talk over a real kernel
/// network path with a real bottleneck (`vmm bench migrate --link`, the link tests). The link is a
/// veth pair; with a round trip or a loss, which need tc's netem and this host's kernel lacks, it is a
/// TUN device in each namespace with a DelayLine between them. The process makes and removes
/// everything itself (it must be root) and uses only addresses inside its own namespaces.
public final class ShapedLink: @unchecked Sendable {   // made and removed by one owner; `within` touches only the calling thread
    /// A link's shape: a rate as tc writes it (`100mbit`, `1gbit`, `10gbit`), and optionally a round
    /// trip and a loss (`1gbit,20ms,0.1%`).
    public struct Shape: Sendable, CustomStringConvertible {
        public var rate: String
        /// Bits per second.
        public var bitsPerSecond: Double
        /// Seconds a packet and its answer spend on the link (half each way).
        public var roundTrip: Double = 0
        /// The share of packets lost, each way.
        public var loss: Double = 0

        /// `RATE[,RTT[,LOSS%]]`, e.g. `1gbit`, `1gbit,20ms`, `1gbit,20ms,0.1%`.
        public init(parsing text: String) throws {
            let parts = text.split(separator: ",").map { String($0).lowercased() }
            guard let first = parts.first, let bits = Self.bits(first), parts.count <= 3 else {
                throw MigrationError(.badOption, "a link is RATE[,RTT[,LOSS%]] such as 1gbit or 1gbit,20ms,0.1%, not \(text)")
            }
            rate = first
            bitsPerSecond = bits
            if parts.count > 1 {
                let t = parts[1]
                let ms = t.hasSuffix("ms") ? Double(t.dropLast(2)) : t.hasSuffix("us") ? Double(t.dropLast(2)).map { $0 / 1000 } : nil
                guard let ms, ms >= 0, ms <= 10_000 else { throw MigrationError(.badOption, "a link's round trip is like 20ms or 200us, not \(t)") }
                roundTrip = ms / 1000
            }
            if parts.count > 2 {
                guard parts[2].hasSuffix("%"), let p = Double(parts[2].dropLast()), p >= 0, p < 100 else {
                    throw MigrationError(.badOption, "a link's loss is a percentage like 0.1%, not \(parts[2])")
                }
                loss = p / 100
            }
        }

        public var description: String {
            rate + (roundTrip > 0 || loss > 0 ? String(format: ", RTT %g ms", roundTrip * 1000) : "")
                + (loss > 0 ? String(format: ", %g%% loss", loss * 100) : "")
        }

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
        let delayed = shape.roundTrip > 0 || shape.loss > 0
        let steps: [[String]] = [
            ["netns", "add", names.source], ["netns", "add", names.destination],
            ["-n", names.source, "link", "set", "lo", "up"], ["-n", names.destination, "link", "set", "lo", "up"],
        ] + (delayed ? [] : [
            ["link", "add", a, "netns", names.source, "type", "veth", "peer", "name", b, "netns", names.destination],
            ["-n", names.source, "addr", "add", "\(subnet).1/24", "dev", a],
            ["-n", names.destination, "addr", "add", "\(subnet).2/24", "dev", b],
            ["-n", names.source, "link", "set", a, "up"], ["-n", names.destination, "link", "set", b, "up"],
        ])
        do {
            for s in steps {
                try Self.run("ip", s)
                if s.count == 3 && s[0] == "netns" && s[1] == "add" { created.append(s[2]) }
            }
            if delayed {
                // A TUN device in each namespace (made from a thread inside it), point to point, with
                // large packets so the delay line copies few of them.
                func tun(_ side: Side, _ name: String) throws -> FileDescriptor {
                    let fd = try within(side) { cvmm_tun_open(name) }
                    guard fd >= 0 else { throw MigrationError.connection("open a TUN device: \(String(cString: strerror(-fd))) (a delayed link needs /dev/net/tun)") }
                    return FileDescriptor(owning: fd)
                }
                delayLine = DelayLine(try tun(.source, a), try tun(.destination, b), roundTrip: shape.roundTrip, loss: shape.loss)
                for (ns, dev, here, there) in [(names.source, a, "\(subnet).1", "\(subnet).2"), (names.destination, b, "\(subnet).2", "\(subnet).1")] {
                    try Self.run("ip", ["-n", ns, "link", "set", dev, "mtu", "65000", "up"])
                    try Self.run("ip", ["-n", ns, "addr", "add", here, "peer", there, "dev", dev])
                }
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

    /// The wire of a delayed link.
    private var delayLine: DelayLine?

    private func remove() {
        delayLine?.stop()
        delayLine = nil
        // The veth pair goes with its namespaces.
        for ns in created { try? Self.run("ip", ["netns", "del", ns]) }
        created = []
    }

    /// Runs `body` on this thread inside `side`'s namespace (sockets made there stay there), then
    /// puts the thread back.
    public func within<T>(_ side: Side, _ body: () throws -> T) throws -> T {
        let name = side == .source ? names.source : names.destination
        let home = try Self.namespace("/proc/thread-self/ns/net")
        let target = try Self.namespace("/var/run/netns/\(name)")
        guard cvmm_setns_net(target.raw) == 0 else {
            throw MigrationError.connection("setns into \(name): \(String(cString: strerror(errno))) (a shaped link needs root)")
        }
        defer {
            // A thread left in the other namespace would make every later socket there: no way on.
            if cvmm_setns_net(home.raw) != 0 { fatalError("setns back from \(name): \(String(cString: strerror(errno)))") }
        }
        return try body()
    }

    /// A network namespace's file, for setns.
    private static func namespace(_ path: String) throws -> FileDescriptor {
        do { return try FileDescriptor(opening: path, O_RDONLY) } catch {
            throw MigrationError.connection("cannot open the network namespace \(path)", cause: error)
        }
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
