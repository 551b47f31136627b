//! A test tree with every kind of entry, and one listing of it that host and guest both
//! print, so a guest's view of an imported tree is compared line by line with the source.
//!
//! Both are shell snippets for busybox or coreutils: they run on the build machine, in the
//! test host and in guests alike.

/// Defines `make_tree DIR LARGE_MIB`: a large random file, hundreds of small files in
/// nested directories, an executable, symlinks (relative, into a directory, dangling and
/// absolute), an empty file and an empty directory.
pub const MAKE_TREE: &str = r#"
make_tree() {
  mkdir -p "$1/bin" "$1/many/sub" "$1/empty-dir" "$1/deep/a/b/c"
  dd if=/dev/urandom of="$1/large" bs=1M count="$2" 2>/dev/null
  printf '#!/bin/sh\necho tool-ran\n' > "$1/bin/tool"
  chmod 755 "$1/bin/tool"
  ln -s bin/tool "$1/link-to-tool"
  ln -s many/sub "$1/link-to-dir"
  ln -s /nonexistent/target "$1/dangling"
  : > "$1/empty-file"
  echo deep > "$1/deep/a/b/c/file"
  i=0; while [ $i -lt 300 ]; do echo "small file $i" > "$1/many/f$i"; i=$((i + 1)); done
  i=0; while [ $i -lt 100 ]; do head -c $((i * 37)) "$1/large" > "$1/many/sub/g$i"; i=$((i + 1)); done
}
"#;

/// How many entries `make_tree` makes below its root (`find . | wc -l` minus the root).
pub const TREE_ENTRIES: usize = 415;

/// Defines `list_tree DIR PREFIX MODES`: one line per entry below DIR, sorted, as
/// `PREFIX l PATH TARGET`, `PREFIX d PATH MODE` or `PREFIX f PATH MODE SHA256`. MODES is
/// `stat` to print the modes found, or `store` to print the modes the store gives the
/// entry (0555 for directories and executables, 0444 for other files), so a source tree's
/// listing is what a mount of its import must show.
pub const LIST_TREE: &str = r#"
list_tree() {
  (cd "$1" && find . | LC_ALL=C sort | while IFS= read -r f; do
    [ "$f" = . ] && continue
    if [ -L "$f" ]; then
      echo "$2 l $f $(readlink "$f")"
      continue
    fi
    if [ "$3" = stat ]; then mode=$(stat -c %a "$f")
    elif [ -d "$f" ] || [ -x "$f" ]; then mode=555
    else mode=444; fi
    if [ -d "$f" ]; then
      echo "$2 d $f $mode"
    else
      echo "$2 f $f $mode $(sha256sum < "$f" | cut -d ' ' -f 1)"
    fi
  done)
}
"#;

/// The lines of `text` that start with `prefix` (after leading spaces), prefix removed.
pub fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix(prefix))
        .map(str::trim_end)
        .collect()
}

/// The value of the last `key=value` line in `text` (the line trimmed of surrounding
/// whitespace, a serial console's `\r` included).
pub fn last_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
}
