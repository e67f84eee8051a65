import { createHmac, timingSafeEqual } from "node:crypto";
app.post("/events", express.raw({ type: "*/*" }), (req, res) => {
const sig = req.headers["x-sautikit-signature"] ?? "";
const secret = process.env.WEBHOOK_SECRET;
// Parse timestamp and signature
const parts = Object.fromEntries(sig.split(",").map(p => p.split("=", 2)));
const ts = parts["t"];
const v1 = parts["v1"];
if (!ts || !v1) return res.status(401).end("missing signature");
if (Math.abs(Date.now() / 1000 - Number(ts)) > 300) return res.status(401).end("stale");
const expected = createHmac("sha256", secret)
.update(req.body).update(".").update(ts).digest("hex");
if (!timingSafeEqual(Buffer.from(v1), Buffer.from(expected))) {
return res.status(401).end("bad signature");
}
const event = JSON.parse(req.body);
console.log(event.event_kind, event.payload?.call_id, event.payload?.status);
res.sendStatus(200);
});
