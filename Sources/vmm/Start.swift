import ArgumentParser
import Control
import Foundation
import Glibc
import Migration
import VirtualMachine
import Workload

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a VM that runs until told to quit, driven through a control socket (QMP's wire format; docs/control-socket.md).",
        discussion: "Drive it with `vmm ctl PATH COMMAND [NAME=VALUE ...]` or `socat - UNIX-CONNECT:PATH`. Ctrl-C or SIGTERM quits it."
    )

    @OptionGroup var guest: GuestOptions
    @Option(help: "Workload spec (ws defaults to all memory); it runs until the VM quits.")
    var workload: String = "pattern=zipf:0.8,write=0.3"
    @Option(help: "The control socket to serve (a Unix socket path, mode 600).")
    var api: String
    @Option(help: "Wait for a migration on this address (tcp:HOST:PORT or unix:PATH) instead of starting a guest; the guest options are then the source's.")
    var incoming: String?
    @Option(parsing: .upToNextOption, help: "Restore this snapshot chain (a full snapshot, then its diffs in order) and run it, instead of starting a guest.")
    var restore: [String] = []
    @Flag(help: "With --restore: start the guest at once and read each page from the files when it is first touched (userfaultfd), the rest filled in behind.")
    var lazy = false
    @Flag(help: "Log with the dirty ring, as QEMU's dirty-ring-size: a dirty limit (set-vcpu-dirty-limit) needs it on kvm, where it is chosen before the vCPUs first run.")
    var dirtyRing = false
    @Option(help: "With --incoming: the pre-shared key file the source uses.")
    var keyFile: String?
    @Option(help: "With --incoming: refuse guests with more memory than this (e.g. 8G).")
    var maxMemory: ByteSize?

    func validate() throws {
        if incoming != nil && !restore.isEmpty { throw ValidationError("--incoming and --restore: give one") }
        if lazy && restore.isEmpty { throw ValidationError("--lazy goes with --restore") }
        if dirtyRing && (incoming != nil || !restore.isEmpty) { throw ValidationError("--dirty-ring goes with a VM started here, not with --incoming or --restore") }
    }

    func run() throws {
        let managed: ManagedVM
        if let incoming {
            let address = try MigrationAddress(parsing: incoming)
            let key = try keyFile.map { try MigrationKey(file: $0) }
            let listener = try Listener(address)
            managed = ManagedVM(incoming: listener, options: ReceiveOptions(key: key, acceptTimeout: 3600, maxMemory: maxMemory?.bytes))
            warn("vmm: waiting for a migration on \(listener.address)")
        } else if !restore.isEmpty {
            managed = try ManagedVM(restoring: restore, lazy: lazy)
            warn("vmm: restored \(restore.count) snapshot file(s)\(lazy ? " lazily (its pages follow as it runs)" : ""); the guest runs on")
        } else {
            var spec = try guest.workload(workload)
            spec.stop = .duration(WorkloadStop.maxDuration)
            managed = try ManagedVM(vm: try guest.makeVM(), workload: spec, dirtyRing: dirtyRing)
        }
        // Ready for a quit before the socket takes one.
        let quit = DispatchSemaphore(value: 0)
        managed.onQuit = { quit.signal() }
        let server = try ControlServer(path: api, handler: managed, version: "0.4")
        // Called under the VM's lock: nothing here may block (stderr could), so the line is queued.
        let eventLog = DispatchQueue(label: "event-log")
        managed.onEvent { name, data in
            server.emit(name, data)
            eventLog.async { warn("vmm: event \(name) \(data)") }
        }
        warn("vmm: control socket on \(api) (try: vmm ctl \(api) query-status)")
        // Ctrl-C and SIGTERM quit as the quit command does.
        signal(SIGINT, SIG_IGN)
        signal(SIGTERM, SIG_IGN)
        var sources: [DispatchSourceSignal] = []
        for s in [SIGINT, SIGTERM] {
            let source = DispatchSource.makeSignalSource(signal: s)
            source.setEventHandler { Thread { managed.shutdown() }.start() }
            source.resume()
            sources.append(source)
        }
        quit.wait()
        server.stop()
        eventLog.sync {}   // the last events' lines (SHUTDOWN) before ours
        warn("vmm: shut down")
    }
}

struct Ctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send one command to a VM's control socket and print its answer (JSON) on stdout.",
        discussion: "Arguments are NAME=VALUE: a VALUE that reads as JSON (a number, true, false, null, a quoted string, an object) is taken as such, anything else as a string. Exit status 1 when the VM answers with an error (its class and description go to stderr)."
    )

    @Argument(help: "The control socket (vmm start --api PATH).")
    var path: String
    @Argument(help: "The command, e.g. query-status, stop, cont, migrate, query-migrate, quit.")
    var command: String
    @Argument(help: "Its arguments, NAME=VALUE.")
    var arguments: [String] = []
    @Option(help: "How long to wait for the answer.")
    var timeout: Seconds = Seconds(argument: "30s")!

    func run() throws {
        var pairs: [(String, JSON)] = []
        for a in arguments {
            guard let eq = a.firstIndex(of: "="), eq != a.startIndex else { throw ValidationError("argument \(a): write NAME=VALUE") }
            let value = String(a[a.index(after: eq)...])
            pairs.append((String(a[..<eq]), (try? JSON.parse(value)) ?? .string(value)))
        }
        let client = try ControlClient(path: path, timeout: timeout.value)
        let answer = try client.execute(command, .object(pairs))
        switch answer {
        case let .success(value): printJSON(value.description)
        case let .failure(e):
            warn("\(e.errorClass): \(e.desc)")
            throw ExitCode.failure
        }
    }
}
