import ArgumentParser
import CVMMSys

@main
struct VMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmm",
        abstract: "A virtual machine monitor memory core: guest memory, a stage-2 MMU, software vCPUs.",
        subcommands: [Demo.self, Run.self, Start.self, Ctl.self, Migrate.self, Receive.self, Key.self, Snapshot.self, DirtyRate.self, Bench.self]
    )

    static func main() {
        // Sealing a record allocates its output (swift-crypto has no in-place API): keep glibc from
        // mapping each such buffer fresh and trimming the heap after it, which costs a page fault per
        // 4 KiB on every record (half the encrypted migration's throughput on this nested host).
        cvmm_keep_heap(64 << 20, 1 << 30)
        let command: ParsableCommand
        do { command = try parseAsRoot() } catch { exit(withError: error) }
        do {
            var c = command
            try c.run()
        } catch {
            // Under --json a command that fails still ends with its outcome as JSON (those that wrote
            // their own have thrown an ExitCode).
            if Output.json && !(error is ExitCode) {
                let name = type(of: command).configuration.commandName ?? String(describing: type(of: command)).lowercased()
                warn("Error: \(error)")
                printJSON(failureJSON(name, error))
                exit(withError: error is ValidationError ? ExitCode.validationFailure : ExitCode(exitStatus(error)))
            }
            exit(withError: error)
        }
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks: readable rows, and one JSON line with --json.",
        subcommands: [BenchTranslate.self, BenchDirtyLog.self, BenchNested.self, BenchMigrate.self]
    )
}
