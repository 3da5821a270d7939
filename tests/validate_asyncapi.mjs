// Validates an AsyncAPI document with the official parser (@asyncapi/parser, installed by
// .ci/run): prints every diagnostic, exits 1 when one is an error or a warning.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const SEVERITIES = ["error", "warning", "info", "hint"];
const path = process.argv[2];
const { document, diagnostics } = await new Parser().parse(await readFile(path, "utf8"), {
  source: path,
});
for (const d of diagnostics) {
  console.log(`${SEVERITIES[d.severity]} ${d.code} at ${d.path.join(".")}: ${d.message}`);
}
const failed = diagnostics.some((d) => d.severity <= 1);
console.log(document && !failed ? "valid" : "invalid");
process.exit(failed ? 1 : 0);
