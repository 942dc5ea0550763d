import XCTest
@testable import MaPeTKernels

/// Properties of the CCViT and DTM models that hold whatever the weights: the pixel head owns the
/// `cls_pt_*` gradients, the loss weights combine the two heads linearly, and with singleton groups
/// the DTM loss is the plain smooth-L1 of the returned predictions.
final class MaskedModelsTests: XCTestCase {
    private func config(_ kind: PretrainKind) -> PretrainConfig {
        let vit = ViTConfig(imgSize: 16, patchSize: 4, inChans: 3, embedDim: 16, depth: 3, numHeads: 2, mlpRatio: 4,
                            numClasses: 1, globalPool: .token, initValues: 0.5, dropPathRate: 0, qkvBias: true)
        return PretrainConfig(vit: vit, kind: kind, vocabSize: kind == .dtm ? 6 : 9, leastNumber: 4,
                              earlyLayers: 2, headLayers: 2)
    }

    private func images(_ B: Int, seed: UInt64) -> [Float] {
        var rng = ObjectiveRNG(seed: seed)
        return (0..<(B * 3 * 16 * 16)).map { _ in Float(rng.below(1001)) / 1000 }
    }

    private func grads(_ m: PretrainModel) -> [Float] { Array(UnsafeBufferPointer(start: m.grads.floats, count: m.table.total)) }

    func testCCViTHeadsCombineLinearlyAndOwnTheirParameters() throws {
        let k = config(.ccvit), B = 2, n = 16, P = 48
        let model = try XCTUnwrap(CCViTModel(config: k, seed: 3))
        let x = images(B, seed: 1)
        var rng = ObjectiveRNG(seed: 2)
        let tokens = (0..<(B * n)).map { _ in Int32(rng.below(9)) }
        let targets = (0..<(B * n * P)).map { _ in Float(Int(rng.below(2001)) - 1000) / 1000 }
        var masked = [Int32](repeating: 0, count: B * n), replaced = masked
        for i in [0, 1, 5, 16, 17, 30] { masked[i] = 1 }
        for i in [3, 9, 20] { replaced[i] = 1 }

        func step(_ tw: Double, _ pw: Double) throws -> ([Float], CCViTLosses) {
            model.zeroGrad()
            let r = model.trainStep(images: x, tokens: tokens, pixelTargets: targets, masked: masked, replaced: replaced,
                                    B: B, tokenWeight: tw, pixelWeight: pw)
            return (grads(model), try r.get())
        }
        let (gTok, lTok) = try step(1, 0), (gPix, lPix) = try step(0, 1), (gBoth, lBoth) = try step(1, 1)
        XCTAssertEqual(lBoth.total, lBoth.tokens + lBoth.pixels, accuracy: 1e-12)
        XCTAssertEqual(lTok.tokens, lBoth.tokens, accuracy: 1e-12)
        XCTAssertEqual(lPix.pixels, lBoth.pixels, accuracy: 1e-12)
        let scale = gBoth.map(abs).max() ?? 1
        for i in gBoth.indices { XCTAssertEqual(gBoth[i], gTok[i] + gPix[i], accuracy: 1e-5 * scale) }
        for e in model.table.entries where e.name.hasPrefix("cls_pt_") {
            XCTAssert(gTok[e.offset..<(e.offset + e.count)].allSatisfy { $0 == 0 }, "\(e.name) got a token-head gradient")
            XCTAssert(gPix[e.offset..<(e.offset + e.count)].contains { $0 != 0 }, "\(e.name) got no pixel-head gradient")
        }
        for name in ["lm_head.weight", "norm.weight"] {
            let e = try XCTUnwrap(model.table.entries.first { $0.name == name })
            XCTAssert(gPix[e.offset..<(e.offset + e.count)].allSatisfy { $0 == 0 }, "\(name) got a pixel-head gradient")
        }
        // The pixel head reads blocks.(early-1) and the last block's class row: both get its gradient.
        for name in ["blocks.1.mlp.fc2.weight", "blocks.2.mlp.fc2.weight"] {
            let e = try XCTUnwrap(model.table.entries.first { $0.name == name })
            XCTAssert(gPix[e.offset..<(e.offset + e.count)].contains { $0 != 0 }, "\(name) got no pixel-head gradient")
        }
    }

    func testDTMWithSingletonGroupsIsPlainSmoothL1() throws {
        let k = config(.dtm), B = 2, n = 16, D = 6, beta = 2.0
        let model = try XCTUnwrap(BEiTModel(config: k, seed: 4))
        let x = images(B, seed: 5)
        var rng = ObjectiveRNG(seed: 6)
        let target = (0..<(B * n * D)).map { _ in Float(Int(rng.below(8001)) - 4000) / 1000 }   // both branches of ℓ_β
        let membership = (0..<(B * n)).map { Int32($0 % n) }
        var masked = [Int32](repeating: 0, count: B * n)
        for i in [2, 3, 4, 18] { masked[i] = 1 }
        var pred = [Float](repeating: 0, count: B * n * D)
        let loss = try model.dtmTrainStep(images: x, masked: masked, target: target, membership: membership, L: 1,
                                          beta: beta, B: B, predOut: &pred).get()
        var expected = 0.0
        for i in pred.indices {
            let u = abs(Double(pred[i]) - Double(target[i])) * 1 / (1 + dtmGroupMeanEpsilon)
            expected += u < beta ? 0.5 * u * u / beta : u - 0.5 * beta
        }
        XCTAssertEqual(loss, expected / Double(pred.count), accuracy: 1e-9)
        XCTAssert(grads(model).contains { $0 != 0 })
    }
}
