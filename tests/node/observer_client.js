// A second, independent gRPC implementation (Node's @grpc/grpc-js, protos loaded at run time by
// @grpc/proto-loader) asking a flowpipe Observer server what `hubble` would. Prints one JSON object.
// Usage: node observer_client.js ADDRESS PROTO_ROOT SINCE_NS UNTIL_NS NAMESPACE
"use strict";
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [address, protoRoot, sinceNs, untilNs, namespace] = process.argv.slice(2);
const definition = loader.loadSync("observer/observer.proto", {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
const observer = grpc.loadPackageDefinition(definition).observer;
const client = new observer.Observer(address, grpc.credentials.createInsecure());

function stamp(ns) {
  const n = BigInt(ns);
  return { seconds: String(n / 1000000000n), nanos: Number(n % 1000000000n) };
}

function unary(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, (error, response) => (error ? reject(error) : resolve(response))),
  );
}

function flows(request) {
  return new Promise((resolve, reject) => {
    const out = [];
    const call = client.GetFlows(request);
    call.on("data", (response) => {
      if (response.flow) {
        const t = response.flow.time;
        out.push((BigInt(t.seconds) * 1000000000n + BigInt(t.nanos || 0)).toString());
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve(out));
  });
}

async function main() {
  const status = await unary("ServerStatus", {});
  const nodes = await unary("GetNodes", {});
  const last = await flows({ number: 10 });
  const first = await flows({ number: 3, first: true });
  const window = await flows({ since: stamp(sinceNs), until: stamp(untilNs) });
  const filtered = await flows({
    whitelist: [{ source_pod: [namespace + "/"] }, { destination_pod: [namespace + "/"] }],
  });
  let unimplemented = null;
  try {
    await flows({ whitelist: [{ node_labels: ["a=b"] }] });
  } catch (error) {
    unimplemented = error.code;
  }
  console.log(JSON.stringify({
    num_flows: status.num_flows,
    nodes: nodes.nodes.map((n) => n.name).sort(),
    last, first, window, filtered, unimplemented,
  }));
}

main().then(() => process.exit(0), (error) => { console.error(String(error)); process.exit(1); });
