import Foundation
import Testing
@testable import GuestMemory
import KVMBackend
@testable import Migration
@testable import VirtualMachine
@testable import Workload

/// Checks how a migration ended, from both sides' results. The guest has one owner at most: the
/// source if it failed before GO (the guest then is as the caller left it, `sourceState`), the
/// destination if it finished (the guest runs there). Where neither owns it, both threw
/// `SwitchoverInDoubt` and hold it paused; or, with `destinationMayDiscard` (post-copy after END),
/// the source holds it paused in doubt and the destination, which never said COMPLETE, dropped its copy.
func expectOneOwner(source: Result<MigrationReport, Error>, destination: Result<any VirtualMachine, Error>,
                    _ src: any VirtualMachine, _ label: String, sourceState: RunState = .running,
                    destinationMayDiscard: Bool = false) throws {
    let sourceDoubt = source.failure as? SwitchoverInDoubt, destinationDoubt = destination.failure as? SwitchoverInDoubt
    let moved = (try? destination.get()) ?? destinationDoubt?.vm
    let here = src.runState, there = moved?.runState ?? .stopped
    let sourceOwns = source.failure != nil && sourceDoubt == nil
    let destinationOwns = destination.failure == nil
    #expect(!(sourceOwns && destinationOwns), "\(label): both sides own the guest: source \(source), destination \(destination)")
    if !sourceOwns && !destinationOwns {
        #expect(sourceDoubt != nil && (destinationDoubt != nil || destinationMayDiscard),
                "\(label): nobody owns the guest, and not both sides say so: source \(source), destination \(destination)")
    }
    if sourceOwns {
        #expect(here == sourceState, "\(label): a source that failed before GO keeps the guest as it was (\(sourceState)), not \(here)")
        #expect(throws: (any Error).self, "\(label): dirty logging is off again") { _ = try src.getDirtyLog() }
    }
    if source.failure == nil { #expect(here == .stopped, "\(label): the source finished, yet its guest is \(here)") }
    // A guest the source had paused arrives paused (GO says so).
    if destinationOwns { #expect(there == sourceState, "\(label): the destination finished, yet its guest is \(there), not \(sourceState)") }
    if sourceDoubt != nil { #expect(here == .paused, "\(label): in doubt, the source must hold the guest paused, not \(here)") }
    if destinationDoubt != nil { #expect(there == .paused, "\(label): in doubt, the destination must hold the guest paused, not \(there)") }
    if destination.failure != nil && destinationDoubt == nil { #expect(moved == nil) }
}

/// Stops whatever still runs after a test.
func cleanUp(_ src: any VirtualMachine, _ destination: Result<any VirtualMachine, Error>) {
    if src.runState != .stopped { _ = try? src.stop() }
    let moved = (try? destination.get()) ?? (destination.failure as? SwitchoverInDoubt)?.vm
    if let moved, moved.runState != .stopped { _ = try? moved.stop() }
}

extension Result {
    var failure: Failure? { if case let .failure(e) = self { return e } else { return nil } }
}

/// The switchover under fault injection: a proxy cuts, flips, stalls, black-holes or truncates
/// the main connection at every byte that matters to the exchange, in both directions: the end of
/// the stream (STATE, END), GO, and the destination's whole answer (ACCEPT, READY, RUNNING). The
/// guest is paused while it migrates, so the stream's length is the same every run and each fault
/// lands on the byte it names. In every run the guest ends up running on exactly one side, or on
/// neither with both sides saying so.
@Suite(.serialized) struct SwitchoverTests {
    struct Config: Sendable, CustomStringConvertible {
        var backend: BackendKind
        var keyed: Bool
        var description: String { "\(backend)\(keyed ? ", keyed" : "")" }
    }

    static let configs: [Config] = {
        var out = [Config(backend: .soft, keyed: false), Config(backend: .soft, keyed: true)]
        if case let .failure(e) = KVMSystem.availability() {
            print("KVM TESTS SKIPPED: \(e)")
        } else {
            out.append(Config(backend: .kvm, keyed: true))
        }
        return out
    }()

    static let timeout = 1.0
    static let faults: [FaultProxy.Fault] = [.cut, .flip, .stall(timeout * 1.6), .drop, .truncate]

    /// A paused guest with every page holding data, ready to migrate (in one pass and the pause: the
    /// stream then has the same length every run, whatever the load).
    static func guest(_ config: Config) throws -> (any VirtualMachine, WorkloadSpec) {
        let vm = try makeVirtualMachine(VMConfig(backend: config.backend, memory: 4 << 20, backing: .pages4K, vcpus: 1))
        for p in 0..<vm.pages { memset(vm.ram.pointer(page: p), Int32(p & 0xFF) | 1, 4096) }
        let spec = WorkloadSpec(pattern: .uniform, base: vm.workloadBase, workingSet: 2 << 20, writeFraction: 0.5, seed: 9, stop: .duration(60))
        try vm.start(spec)
        try vm.pause()
        return (vm, spec)
    }

    /// One migration through a proxy with `plan`; returns both results and the proxy.
    static func run(_ config: Config, plan: FaultProxy.Plan?, timeout: Double = timeout) throws -> (any VirtualMachine, Result<MigrationReport, Error>,
                                                                      Result<any VirtualMachine, Error>, FaultProxy) {
        let (src, _) = try guest(config)
        let key: MigrationKey? = config.keyed ? .random() : nil
        let listener = try Listener(.tcp(host: "127.0.0.1", port: 0))
        let dest = background { () throws -> any VirtualMachine in
            try receive(on: listener, options: ReceiveOptions(key: key, timeout: timeout, acceptTimeout: 2))
        }
        let proxy = try FaultProxy(to: listener.address, plan: plan)
        let source = Result {
            try migrate(src, over: try Connection.connect(to: proxy.listener.address), options: MigrationOptions(maxIterations: 1, convergence: .force, timeout: timeout, key: key))
        }
        return (src, source, Result { try dest() }, proxy)
    }

    /// The bytes each direction of a clean run carries, and the sizes of the records at their ends.
    static func calibrate(_ config: Config) throws -> (toDestination: Int, toSource: Int) {
        // A clean run: a long timeout, so a loaded host cannot fail it (the offsets do not depend on it).
        let (src, source, destination, proxy) = try run(config, plan: nil, timeout: 10)
        _ = try source.get()
        cleanUp(src, destination)
        return (proxy.bytes(channel: 0, .toDestination), proxy.bytes(channel: 0, .toSource))
    }

    /// The offsets that matter to the switchover, in each direction.
    static func plans(_ config: Config) throws -> [FaultProxy.Plan] {
        let (down, up) = try calibrate(config)
        // A record without payload is 24 bytes, sealed 24 + 16; END carries 32 more (sealed, + 16).
        let r = config.keyed ? 40 : 24, end = r + 32 + (config.keyed ? RecordCipher.tagSize : 0)
        #expect(up == Handshake.acceptSize + 2 * r, "the destination says ACCEPT, READY and RUNNING: \(up) bytes")
        // ACCEPT's first and last byte, READY's first, middle and last, RUNNING's first and last; GO's
        // last and first, END's last, middle and first, STATE's tail.
        let toSource = [0, 87, 88, 88 + r / 2, 88 + r - 1, 88 + r, 88 + 2 * r - 1]
        let toDestination = [down - 1, down - r, down - r - 1, down - r - end / 2, down - r - end, down - r - end - 8]
        return faults.flatMap { f in
            toSource.map { FaultProxy.Plan(direction: .toSource, offset: $0, fault: f) }
                + toDestination.map { FaultProxy.Plan(direction: .toDestination, offset: $0, fault: f) }
        }
    }

    @Test(arguments: configs)
    func neverTwoOwners(_ config: Config) throws {
        var outcomes: [String: Int] = [:]
        let plans = try Self.plans(config)
        // Eight at a time: the guests are paused, and most runs wait out a timeout.
        try concurrently(plans, width: 8, { try Self.run(config, plan: $0) }) { plan, run in
            let (src, source, destination, proxy) = try run.get()
            defer { cleanUp(src, destination) }
            #expect(proxy.faultFired, "\(plan) never fired")
            try expectOneOwner(source: source, destination: destination, src, "\(config): \(plan)", sourceState: .paused)
            let owner = destination.failure == nil ? "destination" : source.failure is SwitchoverInDoubt ? "neither (both in doubt)" : "source"
            outcomes[owner, default: 0] += 1
        }
        print("switchover faults (\(config)): the guest ends on \(outcomes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))")
    }
}
