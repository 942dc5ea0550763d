// Token pooling for the classifier head.
//   mean:   out [B, C] = (1 / (T − start)) Σ_{t ≥ start} input[b, t]   (global_pool='avg', start = 1 skips CLS)
//   select: out [B, C] = input[b, token]                               (global_pool='token', token = 0)

public func meanPoolForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                            B: Int, T: Int, C: Int, start: Int) {
    precondition(start < T)
    let inv = 1 / Float(T - start)
    nonisolated(unsafe) let out = out, input = input
    Parallel.forEach(B) { b in
        let o = out + b * C
        o.update(repeating: 0, count: C)
        for t in start..<T { let x = input + (b * T + t) * C; for j in 0..<C { o[j] += x[j] } }
        for j in 0..<C { o[j] *= inv }
    }
}

public func meanPoolBackward(dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
                             B: Int, T: Int, C: Int, start: Int) {
    let inv = 1 / Float(T - start)
    nonisolated(unsafe) let dInput = dInput, dOut = dOut
    Parallel.forEach(B) { b in
        let g = dOut + b * C
        for t in start..<T { let dx = dInput + (b * T + t) * C; for j in 0..<C { dx[j] += g[j] * inv } }
    }
}

public func tokenSelectForward(out: UnsafeMutablePointer<Float>, input: UnsafePointer<Float>,
                               B: Int, T: Int, C: Int, token: Int) {
    for b in 0..<B { (out + b * C).update(from: input + (b * T + token) * C, count: C) }
}

public func tokenSelectBackward(dInput: UnsafeMutablePointer<Float>, dOut: UnsafePointer<Float>,
                                B: Int, T: Int, C: Int, token: Int) {
    for b in 0..<B {
        let dx = dInput + (b * T + token) * C, g = dOut + b * C
        for j in 0..<C { dx[j] += g[j] }
    }
}
