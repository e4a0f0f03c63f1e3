import ArgumentParser

@main
struct VMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmm",
        abstract: "A virtual machine monitor memory core: guest memory, a stage-2 MMU, software vCPUs.",
        subcommands: [Demo.self, Run.self, Migrate.self, Receive.self, Key.self, Snapshot.self, DirtyRate.self, Bench.self]
    )
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks: readable rows, and one JSON line with --json.",
        subcommands: [BenchTranslate.self, BenchDirtyLog.self, BenchNested.self, BenchMigrate.self]
    )
}
