import Foundation

/// A migration's pre-copy passes as CSV, a header line first.
public func passesCSV(_ passes: [PassRecord]) -> String {
    ([PassRecord.csvHeader] + passes.map(\.csvLine)).joined(separator: "\n") + "\n"
}

/// A migration's pre-copy passes drawn as an SVG image: above, what each pass sent (bars) and what
/// the guest dirtied meanwhile (dots, same scale per second); below, the pause each pass left
/// against the downtime limit (dashed), with the auto-converge throttle noted on each pass.
public func passesSVG(_ passes: [PassRecord], downtimeLimit: Double, title: String) -> String {
    let width = 720.0, panel = 180.0, left = 70.0, right = 20.0, top = 40.0, gap = 50.0
    let height = top + panel * 2 + gap + 40
    let n = max(passes.count, 1)
    let slot = (width - left - right) / Double(n)
    func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
    func f(_ v: Double) -> String { String(format: "%.1f", v) }
    /// A round top for an axis holding `v`.
    func nice(_ v: Double) -> Double {
        guard v > 0 else { return 1 }
        let p = pow(10, floor(log10(v)))
        return [1, 2, 5, 10].map { $0 * p }.first { $0 >= v } ?? 10 * p
    }
    let mib = 1_048_576.0
    let sentMax = nice(passes.map { max(Double($0.bytes), $0.dirtyRate * $0.seconds) / mib }.max() ?? 1)
    let downMax = nice(max(passes.map { $0.expectedDowntime * 1e3 }.max() ?? 1, downtimeLimit * 1e3 * 1.2))
    var svg = """
    <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="11">
    <rect width="100%" height="100%" fill="white"/>
    <text x="\(f(width / 2))" y="20" text-anchor="middle" font-size="14">\(esc(title))</text>

    """
    func axis(_ y0: Double, _ maxValue: Double, _ label: String) {
        svg += "<line x1=\"\(f(left))\" y1=\"\(f(y0))\" x2=\"\(f(left))\" y2=\"\(f(y0 + panel))\" stroke=\"black\"/>\n"
        svg += "<line x1=\"\(f(left))\" y1=\"\(f(y0 + panel))\" x2=\"\(f(width - right))\" y2=\"\(f(y0 + panel))\" stroke=\"black\"/>\n"
        for i in 0...4 {
            let v = maxValue * Double(i) / 4, y = y0 + panel - panel * Double(i) / 4
            svg += "<text x=\"\(f(left - 6))\" y=\"\(f(y + 4))\" text-anchor=\"end\">\(v < 10 ? String(format: "%.1f", v) : String(Int(v)))</text>\n"
            svg += "<line x1=\"\(f(left))\" y1=\"\(f(y))\" x2=\"\(f(width - right))\" y2=\"\(f(y))\" stroke=\"#ddd\"/>\n"
        }
        svg += "<text transform=\"translate(16,\(f(y0 + panel / 2))) rotate(-90)\" text-anchor=\"middle\">\(esc(label))</text>\n"
    }
    let y1 = top, y2 = top + panel + gap
    axis(y1, sentMax, "MiB")
    axis(y2, downMax, "expected pause (ms)")
    for (i, p) in passes.enumerated() {
        let x = left + slot * Double(i), bar = slot * 0.6
        let sent = Double(p.bytes) / mib, dirtied = p.dirtyRate * p.seconds / mib
        let h = panel * sent / sentMax
        svg += "<rect x=\"\(f(x + slot * 0.2))\" y=\"\(f(y1 + panel - h))\" width=\"\(f(bar))\" height=\"\(f(h))\" fill=\"#4a7ebb\"><title>pass \(p.pass): sent \(f(sent)) MiB in \(Int(p.seconds * 1e3)) ms</title></rect>\n"
        svg += "<circle cx=\"\(f(x + slot / 2))\" cy=\"\(f(y1 + panel - panel * dirtied / sentMax))\" r=\"4\" fill=\"#d9534f\"><title>dirtied meanwhile: \(f(dirtied)) MiB (\(f(p.dirtyRate / mib)) MiB/s)</title></circle>\n"
        let d = p.expectedDowntime * 1e3
        svg += "<circle cx=\"\(f(x + slot / 2))\" cy=\"\(f(y2 + panel - panel * min(d, downMax) / downMax))\" r=\"4\" fill=\"#333\"><title>pass \(p.pass): expected pause \(f(d)) ms</title></circle>\n"
        if i > 0 {
            let prev = passes[i - 1].expectedDowntime * 1e3
            svg += "<line x1=\"\(f(x - slot / 2))\" y1=\"\(f(y2 + panel - panel * min(prev, downMax) / downMax))\" x2=\"\(f(x + slot / 2))\" y2=\"\(f(y2 + panel - panel * min(d, downMax) / downMax))\" stroke=\"#333\"/>\n"
        }
        svg += "<text x=\"\(f(x + slot / 2))\" y=\"\(f(y2 + panel + 14))\" text-anchor=\"middle\">\(p.pass)</text>\n"
        if p.throttlePercent > 0 {
            svg += "<text x=\"\(f(x + slot / 2))\" y=\"\(f(y2 - 4))\" text-anchor=\"middle\" fill=\"#a60\">-\(p.throttlePercent)%</text>\n"
        }
    }
    let limitY = y2 + panel - panel * min(downtimeLimit * 1e3, downMax) / downMax
    svg += "<line x1=\"\(f(left))\" y1=\"\(f(limitY))\" x2=\"\(f(width - right))\" y2=\"\(f(limitY))\" stroke=\"#d9534f\" stroke-dasharray=\"6,4\"/>\n"
    svg += "<text x=\"\(f(width - right))\" y=\"\(f(limitY - 4))\" text-anchor=\"end\" fill=\"#d9534f\">downtime limit \(Int(downtimeLimit * 1e3)) ms</text>\n"
    svg += "<text x=\"\(f((left + width - right) / 2))\" y=\"\(f(height - 6))\" text-anchor=\"middle\">pass (bars: sent; red dots: dirtied meanwhile; orange: vCPU throttle)</text>\n"
    svg += "</svg>\n"
    return svg
}
