#if canImport(Glibc)
import Glibc
#endif

/// timm / reference initialisation of a parameter block, shared by every model (ALGORITHMS.md §1):
/// Linear weights trunc-normal(.02) with zero bias; pos_embed and the `truncNormal` extras
/// (mask tokens) trunc-normal(.02); cls_token normal(1e-6); the patch conv PyTorch's default
/// (uniform ±1/√fan_in, weight and bias); LayerNorm (1, 0); layer scale = `initValues`.
/// Draws come from stream 0 of `seed`, in table order, so a seed fixes the weights.
func initializeParameters(_ params: UnsafeMutablePointer<Float>, table: ParameterTable, seed: UInt64,
                          patchDim: Int, initValues: Float?, truncNormal extras: Set<String> = []) {
    var r = Xoshiro256StarStar(seed: seed, stream: 0)
    func normal() -> Double {
        let u1 = 1 - r.uniform(), u2 = r.uniform()   // Box–Muller, u1 in (0, 1]
        return (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
    }
    for e in table.entries {
        let p = params + e.offset, n = e.name
        if n == "cls_token" {
            for i in 0..<e.count { p[i] = Float(1e-6 * normal()) }
        } else if n == "patch_embed.proj.weight" || n == "patch_embed.proj.bias" {
            let bound = 1 / Double(patchDim).squareRoot()
            for i in 0..<e.count { p[i] = Float(r.uniform(-bound, bound)) }
        } else if n == "pos_embed" || extras.contains(n) || (n.hasSuffix(".weight") && e.shape.count == 2) {
            // timm trunc_normal_(std=.02) truncates at ±2 (absolute): redraw outside.
            for i in 0..<e.count {
                var v = 0.02 * normal()
                while abs(v) > 2 { v = 0.02 * normal() }
                p[i] = Float(v)
            }
        } else if n.hasSuffix(".gamma") {
            p.update(repeating: initValues ?? 1, count: e.count)
        } else if n.hasSuffix("norm1.weight") || n.hasSuffix("norm2.weight") || n == "norm.weight" || n == "fc_norm.weight"
                    || n == "cls_pt_norm.weight" {
            p.update(repeating: 1, count: e.count)
        } else {
            p.update(repeating: 0, count: e.count)
        }
    }
}
